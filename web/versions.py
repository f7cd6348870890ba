"""The versions of what serves a request, for GET /info and the start-up log line."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("torch", "transformers", "sentence-transformers", "openvino", "nncf", "gradio", "fastapi",
            "prometheus-client")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
