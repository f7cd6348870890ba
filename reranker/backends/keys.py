"""What a converted model is keyed by: the model's files by content, the libraries that shaped the trace, the
trace's format. A fine-tune copied over a model, even with its times kept, gets a key of its own; a start whose
files have not changed reads none of them (their digests are remembered in the cache)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from contextlib import suppress
from pathlib import Path, PurePath

from reranker.versions import installed

logger = logging.getLogger(__name__)

# Bump when the traced module (reranker.backends.openvino.Scores, its inputs or attention) changes.
FORMAT = 1
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
    `cp -p`, or baked into an image with fixed timestamps, keeps them. `digests` None: nothing remembered, every
    file hashed (once per process)."""
    digest = hashlib.sha256()
    files = model_files(model_id)
    digest.update(json.dumps({"model": model_id, "remote_code": trust_remote_code, "format": FORMAT,
                              "libraries": library_versions(), "parts": parts}, sort_keys=True).encode())
    if files is not None:
        paths = model_paths(files)
        for (relative, _), key in zip(paths, content_keys(files, paths, digests), strict=True):
            digest.update(f"{relative}\0{key}\n".encode())
    else:
        digest.update(f"unresolved:{time.time_ns()}".encode())  # nothing to key on: never reuse
    name = model_id.rstrip("/").split("/")[-1] or "model"
    return f"{name}-{digest.hexdigest()[:20]}"


def content_keys(folder: Path, paths: list[tuple[PurePath, Path]], digests: Path | None) -> list[str]:
    """content_key of each of `paths` (relative to `folder`, and where they lie), the sha256 digests taken from and
    remembered in `digests`' memo of `folder` while each file's identity holds."""
    memo = memo_path(folder, digests)
    stored = _read_memo(memo)
    _HASHED.update(stored)
    remembered: dict[Identity, str] = {}
    keys = []
    for relative, path in paths:
        key, identity = content_key(path, relative, _HASHED)
        if identity is not None:
            remembered[identity] = key
        keys.append(key)
    if memo is not None and remembered != stored:
        _write_memo(memo, folder, remembered)
    return keys


def remember(folder: Path, digests: Path | None, written: dict[str, str]) -> None:
    """Remember the sha256 of files this process has just written to `folder` and hashed (`written`: name to
    digest), so the next start does not read them again. The writer knows no later write raced its hash, which
    RECENT_SECONDS guards against for files found on disk."""
    memo = memo_path(folder, digests)
    if memo is not None:
        with suppress(OSError):
            _write_memo(memo, folder, {_identity((folder / name).stat()): sha for name, sha in written.items()})


def memo_path(files: Path, digests: Path | None) -> Path | None:
    """Where `digests` remembers the file digests of folder `files` (None: nowhere)."""
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
        memo.parent.mkdir(parents=True, exist_ok=True)  # staging files of killed writers: ConvertedModels.save
        with staging.open("x") as f:  # the umask's mode, as for the converted models
            json.dump({"format": DIGESTS_FORMAT, "folder": str(files),
                       "files": [[*identity, sha] for identity, sha in sorted(remembered.items())]}, f)
        os.replace(staging, memo)
    except OSError as err:
        logger.debug("model file digests could not be remembered", extra={"cache": str(memo), "cause": str(err)})
    finally:
        with suppress(OSError):
            staging.unlink(missing_ok=True)


