"""Converted models on disk (RERANKER_CACHE_DIR), keyed by what they were made from, so a restart loads the
OpenVINO graph instead of tracing the PyTorch model again."""

from __future__ import annotations

import functools
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

from reranker.backends.keys import (
    DIGESTS,
    FORMAT,
    content_keys,
    file_sha256,
    library_versions,
    memo_path,
    remember,
)
from reranker.errors import ModelLoadError
from reranker.settings import SettingsError, default_cache_dir

logger = logging.getLogger(__name__)

# Bump when what reranker.model stores of a tokenizer in serving.json changes, or what it checks before storing.
# 3 (2026-12-04): the length limit is min(tokenizer, position embeddings), and the tokenizer passed check_vocabulary.
SERVING_FORMAT = 3
# The graph's files, whose sizes and sha256 digests meta.json keeps: OpenVINO reads a weights file changed in
# place (same size, other bytes) without a word, and would serve its scores.
GRAPH_FILES = ("model.xml", "model.bin")
# What the cache writes besides its entries (named by their key, with meta.json saying so): staging folders and
# files, and entries set aside while being removed. Nothing else in the folder is touched.
STAGING = re.compile(r"\..+-[0-9a-f]{12}(\.json)?")
# A staging entry untouched this long was left by a process that died while saving it.
STALE_SECONDS = 3600
# In each entry: its mtime is when a start last took the entry (or stored it).
LAST_USED = "last-used"


@functools.lru_cache(maxsize=8)  # once per folder and process: a start makes more than one ConvertedModels
def _warn_if_a_file(cache_dir: str) -> None:
    with suppress(OSError):  # a folder this user cannot see into: its save says why, if it fails
        if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
            logger.warning("the cache folder (RERANKER_CACHE_DIR, or its default) is a file: no converted model is "
                           "cached, and each start converts again; name a folder (it is created where missing)",
                           extra={"cache_dir": cache_dir})


class ConvertedModels:
    """`<cache_dir>/openvino/<key>/model.xml` (+ .bin and meta.json), and serving.json: how to tokenize for the
    model, which lets the next start skip loading it in PyTorch. Writes are atomic (a staging folder or file
    renamed into place), so replicas converting at once never read half a model, and each entry's meta.json keeps
    the size and sha256 of its graph's files, checked before it is read. Entries get the modes the
    user's umask gives (0755 folders, 0644 files under the usual 022): a cache warmed by another user, root at
    image build say, serves this one. A cache that cannot be read or written is a warning, never a failure;
    only a default location that cannot be named (no home directory) stops the start.

    Entries are keyed by library versions among the rest, so every upgrade leaves the old ones behind: each save
    first removes this user's entries that no start has taken for `max_age_days` (RERANKER_CACHE_MAX_AGE_DAYS;
    0 keeps them all). A start that takes an entry marks it used; another user's start cannot, and does not
    remove it either."""

    def __init__(self, cache_dir: str | None, core: ov.Core, max_age_days: float = 0.0) -> None:
        """`cache_dir` None: RERANKER_CACHE_DIR's default, resolved here, where it is first needed."""
        if cache_dir is None:
            try:
                cache_dir = default_cache_dir()
            except SettingsError as err:
                raise ModelLoadError(str(err)) from err
        self.root = Path(cache_dir).expanduser() / "openvino"
        self.digests = Path(cache_dir).expanduser() / DIGESTS
        self._core = core
        self.max_age_days = max_age_days
        _warn_if_a_file(str(self.root.parent))

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
        entry, model = xml.parent, None
        try:
            damage = self._damage(entry)
            model = self._core.read_model(str(xml)) if damage is None else None
        except Exception as err:
            damage = f"{type(err).__name__}: {err}"[:300]
        if model is None:  # a damaged entry is converted again, not served
            # Another user's entry is left alone: it may serve that user's replicas, and this one cannot remove it.
            if _owner(entry) == os.getuid() and self._remove(entry):
                logger.warning("a cached converted model could not be read; removed, converting again",
                               extra={"cache": str(entry), "cause": damage})
            else:
                logger.warning("a cached converted model could not be read; converting again without replacing it",
                               extra={"cache": str(entry), "owner_uid": _owner(entry), "cause": damage})
            return None
        with suppress(OSError):  # another user's entry, or a read-only cache: served all the same
            (xml.parent / LAST_USED).touch()  # created where an entry from before markers has none
        return model

    def save(self, key: str, model: ov.Model, **meta: Any) -> None:
        """Keep `model` under `key`; a cache that cannot be written is logged, not fatal. Staging folders left
        by processes that died while saving are removed first."""
        target = self.path(key)
        staging: Path | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            remove_stale(self.root)
            remove_stale(self.digests)
            self.remove_unused()
            staging = self.root / f".{key}-{uuid.uuid4().hex[:12]}"
            staging.mkdir()  # not tempfile.mkdtemp: its 0700 would keep every other user out
            # float32 weights as they are: the default would halve them to float16 and change the scores.
            ov.save_model(model, str(staging / "model.xml"), compress_to_fp16=False)
            written = {name: file_sha256(staging / name) for name in GRAPH_FILES}
            files = {name: {"bytes": (staging / name).stat().st_size, "sha256": sha} for name, sha in written.items()}
            (staging / "meta.json").write_text(json.dumps(
                {"key": key, "libraries": library_versions(), "format": FORMAT, "files": files, **meta}, indent=1,
                default=str))
            (staging / LAST_USED).touch()
            try:
                staging.rename(target)
                remember(target, self.digests, written)
            except OSError as err:  # another process stored it first (the same model), or a broken entry is there
                self._settle(target, staging, err)
        except Exception as err:  # OpenVINO reports a full disk as a RuntimeError
            logger.warning("the converted model could not be cached; the next start converts again",
                           extra={"cache": str(target), "cause": f"{type(err).__name__}: {err}"[:300]})
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    def remove_unused(self) -> None:
        """Remove this user's entries that no start has taken for `max_age_days` (none when it is 0), logging
        each with its size."""
        if self.max_age_days <= 0:
            return
        cutoff = time.time() - self.max_age_days * 86400
        try:
            entries = list(self.root.iterdir())
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith(".") or _owner(entry) != os.getuid() or not _is_entry(entry) or \
                    _last_used(entry) >= cutoff:
                continue
            try:
                size = _size(entry)
            except OSError:  # an entry that cannot be walked is left as it is
                continue
            if self._remove(entry):
                logger.info("removed a converted model no start has used for RERANKER_CACHE_MAX_AGE_DAYS",
                            extra={"cache": str(entry), "max_age_days": self.max_age_days,
                                   "mib": round(size / 2**20, 1)})

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
            if self._damage(entry) is not None:
                return False
            self._core.read_model(str(entry / "model.xml"))
            return True
        except Exception:  # missing, unreadable or damaged
            return False

    def _damage(self, entry: Path) -> str | None:
        """What is wrong with `entry`'s graph files against the sizes and sha256 digests its meta.json keeps; None
        when they match. A file's digest is taken from the cache's file-digests while its identity holds (inode,
        size, times), so a start reads the weights once after they were stored, not at every start."""
        meta = _meta(entry)
        if meta is None:
            return "its meta.json cannot be read"
        stored = meta.get("files")
        if not isinstance(stored, dict) or any(not isinstance(stored.get(name), dict) for name in GRAPH_FILES):
            return "its meta.json keeps no digests of the graph (stored by an earlier version)"
        for name in GRAPH_FILES:
            size = (entry / name).stat().st_size
            if size != stored[name].get("bytes"):
                return f"{name} has {size} bytes, {stored[name].get('bytes')} were stored"
        paths = [(PurePath(name), entry / name) for name in GRAPH_FILES]
        for name, digest in zip(GRAPH_FILES, content_keys(entry, paths, self.digests), strict=True):
            if digest != stored[name].get("sha256"):
                return f"{name} does not match the sha256 stored with it: changed since it was stored"
        return None

    def _remove(self, entry: Path) -> bool:
        """Remove `entry` all at once, so a replica never sees half of it: renamed aside, then deleted, with the
        digests remembered of its files. False when it cannot be."""
        aside = self.root / f".{entry.name}-removed-{uuid.uuid4().hex[:12]}"
        memo = memo_path(entry, self.digests)
        try:
            entry.rename(aside)
        except OSError:
            return False
        shutil.rmtree(aside, ignore_errors=True)  # what is left goes with the stale staging folders
        if memo is not None:
            with suppress(OSError):
                memo.unlink(missing_ok=True)
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
        if not isinstance(spec, dict) or spec.get("format") != SERVING_FORMAT:
            return None  # from an earlier version: the start loads the model in full and stores it again
        if spec.pop("sha256", None) != _spec_digest(spec):
            logger.warning("a cached serving.json was changed since it was stored; loading the model in full",
                           extra={"cache": str(entry)})
            return None
        return spec

    def save_serving(self, key: str, spec: dict[str, Any]) -> None:
        """Store `spec` beside the converted model under `key`; a failure is logged, not fatal."""
        entry = self.path(key)
        staging = entry / f".serving-{uuid.uuid4().hex[:12]}.json"
        try:
            if not entry.is_dir():  # the graph itself was not stored, and save said so
                return
            remove_stale(entry)
            stored = {**spec, "format": SERVING_FORMAT}
            with staging.open("x") as f:  # the umask's mode, as for the graph
                json.dump({**stored, "sha256": _spec_digest(stored)}, f)
            os.replace(staging, entry / "serving.json")
        except OSError as err:
            logger.warning("how to serve the converted model could not be cached; the next start loads it in full",
                           extra={"cache": str(entry), "cause": f"{type(err).__name__}: {err}"[:300]})
        finally:
            with suppress(OSError):
                staging.unlink(missing_ok=True)


def _spec_digest(spec: dict[str, Any]) -> str:
    """serving.json's digest of its own content: a tokenizer setting edited by hand would change every score."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _meta(entry: Path) -> dict[str, Any] | None:
    """`entry`'s meta.json; None when it cannot be read or holds no object."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _is_entry(entry: Path) -> bool:
    """Whether `entry` is one of the cache's own: a folder whose meta.json names it. Anything else under the cache
    (RERANKER_CACHE_DIR may be a folder that holds other things) is never removed."""
    meta = _meta(entry)
    return meta is not None and meta.get("key") == entry.name


def _owner(path: Path) -> int | None:
    try:
        return path.stat().st_uid
    except OSError:
        return None


def _last_used(entry: Path) -> float:
    """When a start last took `entry` (its marker's mtime; an entry from before markers: its meta.json's); inf
    when that cannot be read, so nothing is removed on a guess."""
    for name in (LAST_USED, "meta.json"):
        try:
            return (entry / name).stat().st_mtime
        except OSError:
            continue
    return float("inf")


def _size(entry: Path) -> int:
    return sum(path.lstat().st_size for path in entry.rglob("*") if not path.is_dir())


def _unreadable(entry: Path, err: Exception) -> None:
    logger.warning("a conversion cache entry cannot be read; loading and converting the model instead",
                   extra={"cache": str(entry), "cause": f"{type(err).__name__}: {err}"[:300]})


def remove_stale(folder: Path) -> None:
    """Remove the staging folders and files (`.name-<12 hex digits>`, see STAGING) in `folder` that nothing has
    written to for STALE_SECONDS: left by a process killed while saving. A save in progress writes to its own every
    few seconds."""
    for entry in folder.glob(".*"):
        if not STAGING.fullmatch(entry.name):
            continue
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
