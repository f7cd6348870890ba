"""Converted models on disk (RERANKER_CACHE_DIR), keyed by what they were made from, so a restart loads the
OpenVINO graph instead of tracing the PyTorch model again."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import openvino as ov

from reranker.versions import installed

logger = logging.getLogger(__name__)

# Bump when the traced module (reranker.backends.openvino.Scores, its inputs or attention) changes.
FORMAT = 1
# Bump when what reranker.model stores of a tokenizer in serving.json changes.
SERVING_FORMAT = 1
LIBRARIES = ("torch", "transformers", "sentence-transformers", "openvino", "nncf")


def library_versions() -> dict[str, str]:
    return installed(LIBRARIES, missing="none")


def model_files(model_id: str) -> Path | None:
    """The directory the model's files were loaded from: the local directory, or the hub cache's snapshot
    (whose name is the revision's commit hash). None when neither can be found without the network."""
    if os.path.isdir(model_id):
        return Path(model_id)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:
        return None


def fingerprint(model_id: str, trust_remote_code: bool, *parts: str) -> str:
    """A key for a model's converted graph: every file of the model (name, size, modification time), the
    library versions that shape the trace, this module's FORMAT, and any `parts` (int8 settings)."""
    digest = hashlib.sha256()
    files = model_files(model_id)
    digest.update(json.dumps({"model": model_id, "remote_code": trust_remote_code, "format": FORMAT,
                              "libraries": library_versions(), "parts": parts}, sort_keys=True).encode())
    if files is not None:
        for path in sorted(p for p in files.rglob("*") if p.is_file() and ".git" not in p.parts):
            stat = path.stat()  # follows the hub cache's links to the blobs
            digest.update(f"{path.relative_to(files)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    else:
        digest.update(f"unresolved:{time.time_ns()}".encode())  # nothing to key on: never reuse
    name = model_id.rstrip("/").split("/")[-1] or "model"
    return f"{name}-{digest.hexdigest()[:20]}"


class ConvertedModels:
    """`<cache_dir>/openvino/<key>/model.xml` (+ .bin and meta.json), and serving.json: how to tokenize for the
    model, which lets the next start skip loading it in PyTorch. Writes are atomic (a temporary folder or file
    renamed into place), so replicas converting at once never read half a model."""

    def __init__(self, cache_dir: str, core: ov.Core) -> None:
        self.root = Path(cache_dir).expanduser() / "openvino"
        self._core = core

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str) -> ov.Model | None:
        xml = self.path(key) / "model.xml"
        if not xml.is_file():
            return None
        try:
            return self._core.read_model(str(xml))
        except Exception as err:  # a damaged entry is removed and converted again, not served
            logger.warning("a cached converted model could not be read; converting again",
                           extra={"cache": str(xml.parent), "cause": f"{type(err).__name__}: {err}"[:300]})
            shutil.rmtree(xml.parent, ignore_errors=True)
            return None

    def save(self, key: str, model: ov.Model, **meta: Any) -> None:
        """Keep `model` under `key`; a cache that cannot be written is logged, not fatal."""
        target = self.path(key)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=self.root))
            # float32 weights as they are: the default would halve them to float16 and change the scores.
            ov.save_model(model, str(staging / "model.xml"), compress_to_fp16=False)
            (staging / "meta.json").write_text(json.dumps(
                {"key": key, "libraries": library_versions(), "format": FORMAT, **meta}, indent=1, default=str))
            try:
                staging.rename(target)
            except OSError:  # another process stored it first: theirs is the same model
                shutil.rmtree(staging, ignore_errors=True)
        except OSError as err:
            logger.warning("the converted model could not be cached; the next start converts again",
                           extra={"cache": str(target), "cause": str(err)[:300]})

    def load_serving(self, key: str) -> dict[str, Any] | None:
        """What an earlier start stored of how to serve the model under `key`; None when nothing usable is."""
        entry = self.path(key)
        if not (entry / "serving.json").is_file() or not (entry / "model.xml").is_file():
            return None
        try:
            spec = json.loads((entry / "serving.json").read_text())
        except (OSError, ValueError) as err:
            logger.warning("a cached serving.json could not be read; loading the model in full",
                           extra={"cache": str(entry), "cause": f"{type(err).__name__}: {err}"[:300]})
            return None
        return spec if isinstance(spec, dict) and spec.get("format") == SERVING_FORMAT else None

    def save_serving(self, key: str, spec: dict[str, Any]) -> None:
        """Store `spec` beside the converted model under `key`; a failure is logged, not fatal."""
        entry = self.path(key)
        try:
            with tempfile.NamedTemporaryFile("w", dir=entry, prefix=".serving-", suffix=".json",
                                             delete=False) as staging:
                json.dump({**spec, "format": SERVING_FORMAT}, staging)
            os.replace(staging.name, entry / "serving.json")
        except OSError as err:
            logger.warning("how to serve the converted model could not be cached; the next start loads it in full",
                           extra={"cache": str(entry), "cause": str(err)[:300]})
