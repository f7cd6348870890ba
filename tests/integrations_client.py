"""Run by tests/test_clients.py in .venv-integrations: LangChain's and LlamaIndex's Cohere rerankers pointed at
the service by base_url; prints what each returned as JSON lines of (index, score) pairs, best first."""

from __future__ import annotations

import json
import sys


def main(url: str, key: str, query: str, documents: list[str], top_n: int) -> None:
    from langchain_cohere import CohereRerank
    from langchain_core.documents import Document
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.cohere_rerank import CohereRerank as LlamaIndexCohereRerank

    langchain = CohereRerank(cohere_api_key=key, base_url=url, model="rerank-v3.5", top_n=top_n)
    ranked = langchain.compress_documents([Document(page_content=d) for d in documents], query)
    print(json.dumps({"client": "langchain",
                      "results": [[documents.index(d.page_content), d.metadata["relevance_score"]] for d in ranked]}))

    llama_index = LlamaIndexCohereRerank(api_key=key, base_url=url, model="rerank-v3.5", top_n=top_n)
    nodes = llama_index.postprocess_nodes([NodeWithScore(node=TextNode(text=d)) for d in documents],
                                          query_bundle=QueryBundle(query))
    print(json.dumps({"client": "llama_index",
                      "results": [[documents.index(n.node.get_content()), n.score] for n in nodes]}))


if __name__ == "__main__":
    request = json.loads(sys.argv[1])
    main(request["url"], request["key"], request["query"], request["documents"], request["top_n"])
