"""HTTP routes, request/response schemas and the Gradio UI over one Reranker."""
