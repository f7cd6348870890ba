"""The reranker as a Ray Serve application: model replicas (one engine each) behind a FastAPI ingress.

`reranker/` stays free of Ray; this package imports it and `web/`. Start it with
`serve run deploy/ray/serve.yaml` from the project root, or `./start.sh --ray`.
"""

from __future__ import annotations

import os

from app import QUIET_DEFAULTS

# As app.py sets them, unless set already: here, since Serve imports this package in each replica, in the launcher
# and on a cluster (`serve run`, KubeRay) before Gradio or the Hugging Face libraries, whichever starts it.
for _name, _value in QUIET_DEFAULTS.items():
    os.environ.setdefault(_name, _value)
