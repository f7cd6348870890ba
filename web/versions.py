"""The versions of what serves a request, for GET /info and the start-up log line."""

from __future__ import annotations

import platform

from reranker.versions import installed

PACKAGES = ("torch", "transformers", "sentence-transformers", "openvino", "nncf", "gradio", "fastapi",
            "prometheus-client")


def package_versions() -> dict[str, str]:
    return {"python": platform.python_version(), **installed(PACKAGES)}
