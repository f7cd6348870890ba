"""Converted models on disk (RERANKER_CACHE_DIR), keyed by what they were made from, so a restart loads the
OpenVINO graph instead of tracing the PyTorch model again."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

import openvino as ov

from reranker.errors import ModelLoadError
from reranker.settings import SettingsError, default_cache_dir
from reranker.versions import installed

logger = logging.getLogger(__name__)

# Bump when the traced module (reranker.backends.openvino.Scores, its inputs or attention) changes.
FORMAT = 1
# Bump when what reranker.model stores of a tokenizer in serving.json changes.
SERVING_FORMAT = 1
# A staging entry untouched this long was left by a process that died while saving it.
STALE_SECONDS = 3600
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


# A hub snapshot's files link to blobs named by their content's hash (sha256 for LFS files, git's sha1 for others).
HUB_BLOB = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
# Other runtimes' exports beside the PyTorch files, which the service never reads: keyed by size and modification
# time instead of hashing what can be several times the model's own size (some hub repositories ship many).
UNREAD_FOLDERS = ("onnx", "openvino")
CHUNK = 8 * 1024 * 1024
_HASHED: dict[tuple[str, int, int, int, int, int], str] = {}


def content_key(path: Path, relative: Path) -> str:
    """What a model file's content is keyed by: a hub blob's own name, else the sha256 of its bytes."""
    if path.is_symlink():
        blob = path.resolve()
        if blob.parent.name == "blobs" and HUB_BLOB.fullmatch(blob.name):
            return blob.name
    stat = path.stat()  # follows links
    if relative.parts[0] in UNREAD_FOLDERS:
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    # A start keys the model twice (the cache's quick start, then the backend): each file is hashed once per process,
    # while its path, inode, size and times stay the same. A restart hashes again.
    seen = (str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if seen not in _HASHED:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        _HASHED[seen] = digest.hexdigest()
    return _HASHED[seen]


def fingerprint(model_id: str, trust_remote_code: bool, *parts: str) -> str:
    """A key for a model's converted graph: every file of the model by name and content (a hub blob's hash, else
    sha256: about a second per GB of local weights), the library versions that shape the trace, this module's
    FORMAT, and any `parts` (int8 settings). Modification times are not content: a fine-tune copied over the
    model with `cp -p`, or baked into an image with fixed timestamps, keeps them."""
    digest = hashlib.sha256()
    files = model_files(model_id)
    digest.update(json.dumps({"model": model_id, "remote_code": trust_remote_code, "format": FORMAT,
                              "libraries": library_versions(), "parts": parts}, sort_keys=True).encode())
    if files is not None:
        for path in sorted(p for p in files.rglob("*") if p.is_file() and ".git" not in p.parts):
            relative = path.relative_to(files)
            digest.update(f"{relative}\0{content_key(path, relative)}\n".encode())
    else:
        digest.update(f"unresolved:{time.time_ns()}".encode())  # nothing to key on: never reuse
    name = model_id.rstrip("/").split("/")[-1] or "model"
    return f"{name}-{digest.hexdigest()[:20]}"


class ConvertedModels:
    """`<cache_dir>/openvino/<key>/model.xml` (+ .bin and meta.json), and serving.json: how to tokenize for the
    model, which lets the next start skip loading it in PyTorch. Writes are atomic (a staging folder or file
    renamed into place), so replicas converting at once never read half a model. Entries get the modes the
    user's umask gives (0755 folders, 0644 files under the usual 022): a cache warmed by another user, root at
    image build say, serves this one. A cache that cannot be read or written is a warning, never a failure;
    only a default location that cannot be named (no home directory) stops the start."""

    def __init__(self, cache_dir: str | None, core: ov.Core) -> None:
        """`cache_dir` None: RERANKER_CACHE_DIR's default, resolved here, where it is first needed."""
        if cache_dir is None:
            try:
                cache_dir = default_cache_dir()
            except SettingsError as err:
                raise ModelLoadError(str(err)) from err
        self.root = Path(cache_dir).expanduser() / "openvino"
        self._core = core

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str) -> ov.Model | None:
        xml = self.path(key) / "model.xml"
        try:
            if not xml.is_file():
                return None
        except OSError as err:  # a folder this user may not enter: a miss
            _unreadable(xml.parent, err)
            return None
        try:
            return self._core.read_model(str(xml))
        except Exception as err:  # a damaged entry is removed and converted again, not served
            logger.warning("a cached converted model could not be read; converting again",
                           extra={"cache": str(xml.parent), "cause": f"{type(err).__name__}: {err}"[:300]})
            shutil.rmtree(xml.parent, ignore_errors=True)  # not ours to remove when another user wrote it
            return None

    def save(self, key: str, model: ov.Model, **meta: Any) -> None:
        """Keep `model` under `key`; a cache that cannot be written is logged, not fatal. Staging folders left
        by processes that died while saving are removed first."""
        target = self.path(key)
        staging: Path | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            remove_stale(self.root)
            staging = self.root / f".{key}-{uuid.uuid4().hex[:12]}"
            staging.mkdir()  # not tempfile.mkdtemp: its 0700 would keep every other user out
            # float32 weights as they are: the default would halve them to float16 and change the scores.
            ov.save_model(model, str(staging / "model.xml"), compress_to_fp16=False)
            (staging / "meta.json").write_text(json.dumps(
                {"key": key, "libraries": library_versions(), "format": FORMAT, **meta}, indent=1, default=str))
            try:
                staging.rename(target)
            except OSError:  # another process stored it first: theirs is the same model
                pass
        except Exception as err:  # OpenVINO reports a full disk as a RuntimeError
            logger.warning("the converted model could not be cached; the next start converts again",
                           extra={"cache": str(target), "cause": f"{type(err).__name__}: {err}"[:300]})
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    def load_serving(self, key: str) -> dict[str, Any] | None:
        """What an earlier start stored of how to serve the model under `key`; None when nothing usable is."""
        entry = self.path(key)
        try:
            if not (entry / "serving.json").is_file() or not (entry / "model.xml").is_file():
                return None
            spec = json.loads((entry / "serving.json").read_text())
        except (OSError, ValueError) as err:
            _unreadable(entry, err)
            return None
        return spec if isinstance(spec, dict) and spec.get("format") == SERVING_FORMAT else None

    def save_serving(self, key: str, spec: dict[str, Any]) -> None:
        """Store `spec` beside the converted model under `key`; a failure is logged, not fatal."""
        entry = self.path(key)
        staging = entry / f".serving-{uuid.uuid4().hex[:12]}.json"
        try:
            if not entry.is_dir():  # the graph itself was not stored, and save said so
                return
            remove_stale(entry)
            with staging.open("x") as f:  # the umask's mode, as for the graph
                json.dump({**spec, "format": SERVING_FORMAT}, f)
            os.replace(staging, entry / "serving.json")
        except OSError as err:
            logger.warning("how to serve the converted model could not be cached; the next start loads it in full",
                           extra={"cache": str(entry), "cause": f"{type(err).__name__}: {err}"[:300]})
        finally:
            with suppress(OSError):
                staging.unlink(missing_ok=True)


def _unreadable(entry: Path, err: Exception) -> None:
    logger.warning("a conversion cache entry cannot be read; loading and converting the model instead",
                   extra={"cache": str(entry), "cause": f"{type(err).__name__}: {err}"[:300]})


def remove_stale(folder: Path) -> None:
    """Remove the staging folders and files (`.name`) in `folder` that nothing has written to for STALE_SECONDS:
    left by a process killed while saving. A save in progress writes to its own every few seconds."""
    for entry in folder.glob(".*"):
        try:
            times = [entry.stat().st_mtime, *(p.stat().st_mtime for p in entry.iterdir())] if entry.is_dir() else \
                [entry.stat().st_mtime]
            if time.time() - max(times) < STALE_SECONDS:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:  # gone already, or another user's
            continue
