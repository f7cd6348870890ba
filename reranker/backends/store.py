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
from pathlib import Path, PurePath
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
# Where file digests are remembered between starts: <cache_dir>/file-digests/, one JSON file per model folder.
DIGESTS = "file-digests"
DIGESTS_FORMAT = 1
# A file changed this recently is hashed but its digest not remembered: file times come from a clock that ticks
# every few milliseconds, so a file rewritten within the same tick could keep its ctime (git's "racy" entries).
RECENT_SECONDS = 2.0

# (st_dev, st_ino, size, mtime_ns, ctime_ns): what a remembered digest is valid for. `cp -p` and `rsync -a` keep a
# swapped file's size and mtime but cannot set its ctime, so a swap is hashed again.
Identity = tuple[int, int, int, int, int]
_HASHED: dict[Identity, str] = {}  # this process's digests: a read-only cache still hashes once per process
_digests_dir: Path | None = None  # the latest ConvertedModels' <cache_dir>/file-digests, for fingerprint's default


def _identity(stat: os.stat_result) -> Identity:
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def skipped(name: str) -> bool:
    """Folders no loader reads: dot-folders (.git; the .cache/huggingface that `hf download --local-dir` rewrites),
    a Trainer's checkpoint-*/ and TensorBoard's runs/."""
    return name.startswith(".") or name == "runs" or name.startswith("checkpoint-")


def model_paths(folder: Path) -> list[tuple[PurePath, Path]]:
    """Every file under `folder` that a loader may read, by its path relative to `folder`, sorted. Links to folders
    are followed (Python 3.11's rglob does not), except back into a folder the walk is inside of."""
    found: list[tuple[PurePath, Path]] = []

    def walk(directory: Path, relative: PurePath, inside: frozenset[tuple[int, int]]) -> None:
        stat = directory.stat()
        here = (stat.st_dev, stat.st_ino)
        if here in inside:  # a link back up: a loop
            return
        try:
            entries = list(os.scandir(directory))
        except PermissionError:  # as rglob did: a folder this user cannot list holds nothing it can load
            return
        for entry in entries:
            if entry.is_dir():  # follows links
                if not skipped(entry.name):
                    walk(Path(entry.path), relative / entry.name, inside | {here})
            elif entry.is_file():
                found.append((relative / entry.name, Path(entry.path)))

    walk(folder, PurePath(), frozenset())
    return sorted(found, key=lambda item: item[0].parts)


def content_key(path: Path, relative: PurePath, known: dict[Identity, str]) -> tuple[str, Identity | None]:
    """What a model file's content is keyed by: a hub blob's own name, else the sha256 of its bytes, taken from
    `known` when the file's identity is there. Also the identity its sha256 may be remembered under (None: not)."""
    if path.is_symlink():
        blob = path.resolve()
        if blob.parent.name == "blobs" and HUB_BLOB.fullmatch(blob.name):
            return blob.name, None
    stat = path.stat()  # follows links
    if relative.parts[0] in UNREAD_FOLDERS:
        return f"{stat.st_size}:{stat.st_mtime_ns}", None
    identity = _identity(stat)
    if identity in known:
        return known[identity], identity
    started = time.time_ns()
    sha = file_sha256(path)
    # Not remembered when changed just before or while it was read: the next start hashes it again.
    if stat.st_ctime_ns >= started - int(RECENT_SECONDS * 1e9) or _identity(path.stat()) != identity:
        return sha, None
    known[identity] = sha
    return sha, identity


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(model_id: str, trust_remote_code: bool, *parts: str, digests: Path | None = None) -> str:
    """A key for a model's converted graph: every file of the model a loader may read (see `skipped`) by name and
    content (a hub blob's hash, else sha256: about a second per GB of local weights, once; later starts take it from
    `digests` while the file's identity holds), the library versions that shape the trace, this module's FORMAT,
    and any `parts` (int8 settings). Modification times are not content: a fine-tune copied over the model with
    `cp -p`, or baked into an image with fixed timestamps, keeps them. `digests` None: the file-digests folder of
    the cache the latest ConvertedModels opened, if any."""
    digest = hashlib.sha256()
    files = model_files(model_id)
    digest.update(json.dumps({"model": model_id, "remote_code": trust_remote_code, "format": FORMAT,
                              "libraries": library_versions(), "parts": parts}, sort_keys=True).encode())
    if files is not None:
        memo = _memo_path(files, digests or _digests_dir)
        stored = _read_memo(memo)
        _HASHED.update(stored)
        remembered: dict[Identity, str] = {}
        for relative, path in model_paths(files):
            key, identity = content_key(path, relative, _HASHED)
            if identity is not None:
                remembered[identity] = key
            digest.update(f"{relative}\0{key}\n".encode())
        if memo is not None and remembered != stored:
            _write_memo(memo, files, remembered)
    else:
        digest.update(f"unresolved:{time.time_ns()}".encode())  # nothing to key on: never reuse
    name = model_id.rstrip("/").split("/")[-1] or "model"
    return f"{name}-{digest.hexdigest()[:20]}"


def _memo_path(files: Path, digests: Path | None) -> Path | None:
    if digests is None:
        return None
    return digests / f"{hashlib.sha256(str(files.resolve()).encode()).hexdigest()[:20]}.json"


def _read_memo(memo: Path | None) -> dict[Identity, str]:
    """The digests remembered for a model folder; anything unreadable or malformed is a miss, never an error."""
    if memo is None:
        return {}
    try:
        data = json.loads(memo.read_text())
        entries = data["files"] if data.get("format") == DIGESTS_FORMAT else []
        return {(int(e[0]), int(e[1]), int(e[2]), int(e[3]), int(e[4])): e[5] for e in entries
                if len(e) == 6 and all(type(v) is int for v in e[:5]) and isinstance(e[5], str)
                and re.fullmatch(r"[0-9a-f]{64}", e[5])}
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}


def _write_memo(memo: Path, files: Path, remembered: dict[Identity, str]) -> None:
    """Replace the memo atomically (a staging file renamed into place); one that cannot be written is a miss next
    time, nothing more."""
    staging = memo.parent / f".{memo.stem}-{uuid.uuid4().hex[:12]}.json"
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(memo.parent)
        with staging.open("x") as f:  # the umask's mode, as for the converted models
            json.dump({"format": DIGESTS_FORMAT, "folder": str(files),
                       "files": [[*identity, sha] for identity, sha in sorted(remembered.items())]}, f)
        os.replace(staging, memo)
    except OSError as err:
        logger.debug("model file digests could not be remembered", extra={"cache": str(memo), "cause": str(err)})
    finally:
        with suppress(OSError):
            staging.unlink(missing_ok=True)


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
        self.digests = Path(cache_dir).expanduser() / DIGESTS
        self._core = core
        # The backend keys the model with fingerprint() right after opening its cache, without naming the cache:
        # this is where those keys remember file digests.
        global _digests_dir
        _digests_dir = self.digests

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
        except Exception as err:  # a damaged entry is converted again, not served
            entry, cause = xml.parent, f"{type(err).__name__}: {err}"[:300]
            # Another user's entry is left alone: it may serve that user's replicas, and this one cannot remove it.
            if _owner(entry) == os.getuid() and self._remove(entry):
                logger.warning("a cached converted model could not be read; removed, converting again",
                               extra={"cache": str(entry), "cause": cause})
            else:
                logger.warning("a cached converted model could not be read; converting again without replacing it",
                               extra={"cache": str(entry), "owner_uid": _owner(entry), "cause": cause})
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
            except OSError as err:  # another process stored it first (the same model), or a broken entry is there
                self._settle(target, staging, err)
        except Exception as err:  # OpenVINO reports a full disk as a RuntimeError
            logger.warning("the converted model could not be cached; the next start converts again",
                           extra={"cache": str(target), "cause": f"{type(err).__name__}: {err}"[:300]})
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    def _settle(self, target: Path, staging: Path, err: OSError) -> None:
        """`staging` could not be renamed to `target`. Fine when another process stored a readable entry there
        first. A broken one this user owns is replaced; another user's is named in a warning, since otherwise every
        start would convert again with no sign why."""
        if self._usable(target):
            return
        if _owner(target) == os.getuid() and self._remove(target):
            try:
                staging.rename(target)
                return
            except OSError as again:
                err = again
        logger.warning("a broken conversion cache entry is in the way and cannot be replaced; every start converts "
                       "again until its owner (or root) removes it",
                       extra={"cache": str(target), "owner_uid": _owner(target),
                              "cause": f"{type(err).__name__}: {err}"[:300]})

    def _usable(self, entry: Path) -> bool:
        try:
            self._core.read_model(str(entry / "model.xml"))
            return True
        except Exception:  # missing, unreadable or damaged
            return False

    def _remove(self, entry: Path) -> bool:
        """Remove `entry` all at once, so a replica never sees half of it: renamed aside, then deleted. False when
        it cannot be."""
        aside = self.root / f".{entry.name}-removed-{uuid.uuid4().hex[:12]}"
        try:
            entry.rename(aside)
        except OSError:
            return False
        shutil.rmtree(aside, ignore_errors=True)  # what is left goes with the stale staging folders
        return True

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


def _owner(path: Path) -> int | None:
    try:
        return path.stat().st_uid
    except OSError:
        return None


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
