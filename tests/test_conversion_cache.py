"""The conversion cache on disk (reranker.backends.store): what it is keyed by, how it survives a failed or killed
save, and how an entry another user wrote is read. Tiny OpenVINO graphs built by hand: no model is converted."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
from openvino import opset13 as ops

from reranker import ModelLoadError
from reranker.backends.store import STALE_SECONDS, ConvertedModels, fingerprint


def graph(values: int = 4) -> ov.Model:
    x = ops.parameter([values], np.float32, name="x")
    weights = ops.constant(np.arange(values, dtype=np.float32))
    return ov.Model([ops.multiply(x, weights)], [x], "tiny")


def model_folder(path: Path, weights: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "bert"}')
    (path / "model.safetensors").write_bytes(weights)
    return path


def restart() -> None:
    """A new process: nothing hashed yet."""
    from reranker.backends import store

    store._HASHED.clear()


def test_a_model_swapped_in_place_with_the_same_size_and_times_gets_a_new_key(tmp_path: Path) -> None:
    """A fine-tune of the same architecture copied over the model with `cp -p` or `rsync -a`, or baked into an
    image with fixed timestamps: same names, sizes and modification times, other weights."""
    model = model_folder(tmp_path / "model", b"\x01" * 4096)
    before = fingerprint(str(model), False)
    weights = model / "model.safetensors"
    times = os.stat(weights)
    weights.write_bytes(b"\x02" * 4096)
    os.utime(weights, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert os.stat(weights).st_size == times.st_size and os.stat(weights).st_mtime_ns == times.st_mtime_ns
    restart()
    assert fingerprint(str(model), False) != before
    # The same content written again (new inode, times and ctime) is the same model: a cache warmed at image build
    # serves the containers started from that image on any host.
    after = fingerprint(str(model), False)
    shutil.move(model, tmp_path / "elsewhere")
    shutil.copytree(tmp_path / "elsewhere", model)
    os.utime(model / "model.safetensors", ns=(1, 1))
    restart()
    assert fingerprint(str(model), False) == after


def test_hub_blobs_are_keyed_by_the_hash_in_their_name_without_reading_them(tmp_path: Path) -> None:
    """The hub cache's snapshot files link to blobs named by their sha256 (LFS) or git sha1: that name is the
    content's hash already, so a 2 GB checkpoint costs nothing to key."""
    root = tmp_path / "models--org--reranker"

    def key(blob_name: str, content: bytes) -> str:
        shutil.rmtree(root, ignore_errors=True)
        (root / "blobs").mkdir(parents=True)
        (root / "blobs" / blob_name).write_bytes(content)
        folder = root / "snapshots" / ("c" * 40)
        folder.mkdir(parents=True)
        (folder / "model.safetensors").symlink_to(Path("../..") / "blobs" / blob_name)
        return fingerprint(str(folder), False)

    first = key("a" * 64, b"read me and the key changes")
    assert key("a" * 64, b"other bytes under the same blob name") == first  # the bytes were not read
    assert key("b" * 64, b"read me and the key changes") != first


def test_a_failed_save_is_a_warning_and_leaves_no_staging_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(*args: object, **kwargs: object) -> None:
        raise RuntimeError("basic_ios::clear: iostream error")  # what ov.save_model raises on a full disk

    monkeypatch.setattr("reranker.backends.store.ov.save_model", disk_full)
    store = ConvertedModels(str(tmp_path), ov.Core())
    with caplog.at_level(logging.WARNING, logger="reranker"):
        store.save("tiny-0123", graph())
    assert "the converted model could not be cached; the next start converts again" in caplog.messages
    assert list(store.root.iterdir()) == []


# A save under a file size limit, in its own process: the write fails with EFBIG (Python ignores SIGXFSZ), as on
# a full disk.
SAVE_UNDER_LIMIT = """
import resource, sys
import numpy as np, openvino as ov
from openvino import opset13 as ops
from reranker.backends.store import ConvertedModels

x = ops.parameter([1 << 18], np.float32, name="x")
big = ov.Model([ops.multiply(x, ops.constant(np.ones(1 << 18, dtype=np.float32)))], [x], "big")  # 1 MiB
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
ConvertedModels(sys.argv[1], ov.Core()).save("big-0123", big)
print("served on")
"""


def test_a_save_that_runs_out_of_space_does_not_stop_the_start(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-c", SAVE_UNDER_LIMIT, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0 and "served on" in done.stdout, done.stderr[-2000:]
    assert "the converted model could not be cached" in done.stderr
    assert list((tmp_path / "openvino").iterdir()) == []


def test_staging_left_by_a_killed_process_is_removed_by_the_next_save(tmp_path: Path) -> None:
    store = ConvertedModels(str(tmp_path), ov.Core())
    store.root.mkdir(parents=True)
    old = store.root / ".dead-0123-abcdef"
    old.mkdir()
    (old / "model.bin").write_bytes(b"half a model")
    long_ago = time.time() - STALE_SECONDS - 60
    for path in (old / "model.bin", old):
        os.utime(path, (long_ago, long_ago))
    recent = store.root / ".saving-4567-abcdef"  # another replica saving right now
    recent.mkdir()
    store.save("tiny-0123", graph())
    assert sorted(p.name for p in store.root.iterdir()) == [".saving-4567-abcdef", "tiny-0123"]
    assert store.load("tiny-0123") is not None


@pytest.mark.parametrize(("umask", "folder", "file"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_entries_are_readable_by_others_unless_the_umask_says_otherwise(tmp_path: Path, umask: int, folder: int,
                                                                        file: int) -> None:
    """Warmed at image build as root, served as another user: the entry must be readable by that user, as any
    file the builder made would be; a umask that keeps files private keeps the cache private too."""
    store = ConvertedModels(str(tmp_path), ov.Core())
    before = os.umask(umask)
    try:
        store.save("tiny-0123", graph())
        store.save_serving("tiny-0123", {"tokenizer": "{}"})
    finally:
        os.umask(before)
    entry = store.path("tiny-0123")
    assert stat.S_IMODE(entry.stat().st_mode) == folder
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in entry.iterdir()} == {
        name: file for name in ("model.xml", "model.bin", "meta.json", "serving.json")}


def test_an_entry_this_user_cannot_read_is_a_miss_not_a_crash(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    store = ConvertedModels(str(tmp_path), ov.Core())
    store.save("tiny-0123", graph())
    store.save_serving("tiny-0123", {"tokenizer": "{}"})

    def denied(self: Path) -> bool:  # another user's 0700 entry, as this service wrote them before
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "is_file", denied)
    with caplog.at_level(logging.WARNING, logger="reranker"):
        assert store.load_serving("tiny-0123") is None
        assert store.load("tiny-0123") is None
    assert caplog.messages.count("a conversion cache entry cannot be read; loading and converting the model "
                                 "instead") == 2


def test_no_home_and_no_cache_dir_is_a_clear_error_where_the_cache_is_needed(monkeypatch: pytest.MonkeyPatch
                                                                            ) -> None:
    import pwd

    def no_entry(uid: int) -> None:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    for name in ("HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises(ModelLoadError, match="RERANKER_CACHE_DIR is unset and this user has no home directory"):
        ConvertedModels(None, ov.Core())
    assert ConvertedModels("/srv/cache", ov.Core()).root == Path("/srv/cache/openvino")


def test_a_start_hashes_each_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quick start from the cache and the backend both key the model: a 2 GB checkpoint is read once."""
    import hashlib

    model = model_folder(tmp_path / "model", b"\x01" * 4096)
    calls = []
    real = hashlib.sha256

    def counted(*args: bytes) -> hashlib._Hash:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr("reranker.backends.store.hashlib.sha256", counted)
    first = fingerprint(str(model), False)
    files_hashed = len(calls) - 1  # one for the key itself
    assert files_hashed == 2 and fingerprint(str(model), False) == first and len(calls) == 2 + files_hashed
    (model / "model.safetensors").write_bytes(b"\x02" * 8192)  # another file now: hashed again
    assert fingerprint(str(model), False) != first
