"""The reranker as a Ray Serve application: model replicas (one engine each) behind a FastAPI ingress.

`reranker/` stays free of Ray; this package imports it and `web/`. Start it with
`serve run deploy/ray/serve.yaml` from the project root, or `./start.sh --ray`.
"""
