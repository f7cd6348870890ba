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
from reranker.backends.keys import fingerprint
from reranker.backends.store import STALE_SECONDS, ConvertedModels


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
    """A new process: nothing hashed yet (what the cache's file-digests remember stays)."""
    from reranker.backends import keys

    keys._HASHED.clear()


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts as a new process: nothing hashed."""
    monkeypatch.setattr("reranker.backends.keys._HASHED", {})


def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file's digest is remembered once it is 50 ms past its last change instead of 2 s, and the files written so
    far are: the clock file times come from ticks every few ms at most, so a later change gets another ctime."""
    monkeypatch.setattr("reranker.backends.keys.RECENT_SECONDS", 0.05)
    time.sleep(0.1)


def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the model files read and hashed from now on."""
    from reranker.backends import keys

    read: list[str] = []
    real = keys.file_sha256

    def counted(path: Path) -> str:
        read.append(path.name)
        return real(path)

    monkeypatch.setattr(keys, "file_sha256", counted)
    return read


def test_a_model_swapped_in_place_with_the_same_size_and_times_gets_a_new_key(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A fine-tune of the same architecture copied over the model with `cp -p` or `rsync -a`, or baked into an
    image with fixed timestamps: same names, sizes and modification times, other weights; the digests the cache
    remembers of the old files do not hide it (the swap changed the file's ctime)."""
    model = model_folder(tmp_path / "model", b"\x01" * 4096)
    digests = ConvertedModels(str(tmp_path / "cache"), ov.Core()).digests
    settled(monkeypatch)
    before = fingerprint(str(model), False, digests=digests)
    assert list((tmp_path / "cache" / "file-digests").iterdir())  # remembered
    weights = model / "model.safetensors"
    times = os.stat(weights)
    weights.write_bytes(b"\x02" * 4096)
    os.utime(weights, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert os.stat(weights).st_size == times.st_size and os.stat(weights).st_mtime_ns == times.st_mtime_ns
    restart()
    assert fingerprint(str(model), False, digests=digests) != before
    # The same content written again (new inode, times and ctime) is the same model: a cache warmed at image build
    # serves the containers started from that image on any host.
    after = fingerprint(str(model), False, digests=digests)
    shutil.move(model, tmp_path / "elsewhere")
    shutil.copytree(tmp_path / "elsewhere", model)
    os.utime(model / "model.safetensors", ns=(1, 1))
    restart()
    assert fingerprint(str(model), False, digests=digests) == after


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


def test_a_cache_dir_that_is_a_file_is_named_and_the_start_goes_on(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The save's warning gave only NotADirectoryError as the cause, without saying the setting must name a folder."""
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file")
    with caplog.at_level(logging.WARNING, logger="reranker"):
        store = ConvertedModels(str(not_a_folder), ov.Core())
        store.save("tiny-0123", graph())
        assert store.load("tiny-0123") is None
        ConvertedModels(str(not_a_folder), ov.Core())  # a start makes more than one: said once
    warned = [r for r in caplog.records if "is a file" in r.getMessage()]
    assert len(warned) == 1 and vars(warned[0])["cache_dir"] == str(not_a_folder)
    assert warned[0].getMessage().startswith("the cache folder (RERANKER_CACHE_DIR, or its default) is a file")
    assert "the converted model could not be cached; the next start converts again" in caplog.messages
    assert not_a_folder.read_text() == "a file"


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
    old = store.root / ".dead-0123-0123456789ab"
    old.mkdir()
    (old / "model.bin").write_bytes(b"half a model")
    long_ago = time.time() - STALE_SECONDS - 60
    for path in (old / "model.bin", old):
        os.utime(path, (long_ago, long_ago))
    recent = store.root / ".saving-4567-0123456789ab"  # another replica saving right now
    recent.mkdir()
    store.save("tiny-0123", graph())
    assert sorted(p.name for p in store.root.iterdir()) == [".saving-4567-0123456789ab", "tiny-0123"]
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
        name: file for name in ("model.xml", "model.bin", "meta.json", "serving.json", "last-used")}


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
    """The quick start from the cache and the backend both key the model: a 2 GB checkpoint is read once, even
    where the cache cannot be written."""
    model = model_folder(tmp_path / "model", b"\x01" * 4096)
    settled(monkeypatch)
    read = hashes(monkeypatch)
    first = fingerprint(str(model), False)
    assert sorted(read) == ["config.json", "model.safetensors"]
    assert fingerprint(str(model), False) == first and len(read) == 2
    (model / "model.safetensors").write_bytes(b"\x02" * 8192)  # another file now: hashed again
    assert fingerprint(str(model), False) != first and read[2:] == ["model.safetensors"]


def test_a_restart_takes_the_digests_from_the_cache_and_reads_no_model_file(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Hashing 2.2 GB at every start would cost seconds (tens on cold network storage): the cache remembers each
    file's digest for as long as its device, inode, size, mtime and ctime stay the same."""
    model = model_folder(tmp_path / "model", b"\x01" * 4096)
    store = ConvertedModels(str(tmp_path / "cache"), ov.Core())
    settled(monkeypatch)
    first = fingerprint(str(model), False, digests=store.digests)
    restart()
    read = hashes(monkeypatch)
    assert fingerprint(str(model), False, digests=store.digests) == first and read == []
    restart()
    assert fingerprint(str(model), False) == first  # no cache named: hashed, to the same key
    assert sorted(read) == ["config.json", "model.safetensors"]
    shutil.rmtree(store.digests)  # a cache without them: hashed again, to the same key
    restart()
    assert fingerprint(str(model), False, digests=store.digests) == first
    assert sorted(read) == ["config.json", "config.json", "model.safetensors", "model.safetensors"]


def test_just_changed_files_are_hashed_at_every_start_until_they_settle(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A file changed within the last 2 s could be changed again within the same tick of the clock file times come
    from, keeping its ctime: its digest is not remembered yet."""
    monkeypatch.setattr("reranker.backends.keys.RECENT_SECONDS", 3600.0)  # however slowly this test runs
    model = model_folder(tmp_path / "model", b"\x01" * 4096)
    digests = ConvertedModels(str(tmp_path / "cache"), ov.Core()).digests
    read = hashes(monkeypatch)
    fingerprint(str(model), False, digests=digests)
    restart()
    fingerprint(str(model), False, digests=digests)
    assert sorted(read) == ["config.json", "config.json", "model.safetensors", "model.safetensors"]


@pytest.mark.parametrize("memo", ["{", '{"format": 1, "files": [[1, 2]]}', '{"format": 1, "files": [["a"]]}',
                                  '{"format": 1, "files": {"a": 1}}', "[]", "not a file"])
def test_digests_the_cache_cannot_read_or_write_are_a_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           memo: str) -> None:
    model = model_folder(tmp_path / "model", b"\x01" * 4096)
    settled(monkeypatch)
    expected = fingerprint(str(model), False)
    store = ConvertedModels(str(tmp_path / "cache"), ov.Core())
    if memo == "not a file":  # nothing can be read or written there
        store.digests.parent.mkdir(parents=True)
        store.digests.write_text("")
    else:
        fingerprint(str(model), False, digests=store.digests)
        [path] = store.digests.iterdir()
        path.write_text(memo)
    restart()
    read = hashes(monkeypatch)
    assert fingerprint(str(model), False, digests=store.digests) == expected
    assert sorted(read) == ["config.json", "model.safetensors"]
    if memo != "not a file":  # written again, whole
        restart()
        assert fingerprint(str(model), False, digests=store.digests) == expected and len(read) == 2
        assert [p.name for p in store.digests.iterdir()] == [path.name]


def test_only_what_a_loader_reads_is_keyed_wherever_the_model_lies(tmp_path: Path) -> None:
    """Folders are skipped by their path inside the model folder: a model under a `.git` folder is keyed by its
    files, while its own dot-folders (`hf download --local-dir` rewrites .cache/huggingface at every download),
    a Trainer's checkpoint-*/ and TensorBoard's runs/ are not."""
    model = model_folder(tmp_path / "repo" / ".git" / "model", b"\x01" * 4096)
    before = fingerprint(str(model), False)
    for junk in (".cache/huggingface/download/model.safetensors.metadata", ".git/objects/ab/cdef",
                 "checkpoint-500/optimizer.pt", "runs/Dec01_12-00-00/events.out.tfevents", "sub/.hidden/x"):
        (model / junk).parent.mkdir(parents=True, exist_ok=True)
        (model / junk).write_bytes(b"not read by any loader")
    restart()
    assert fingerprint(str(model), False) == before
    (model / "model.safetensors").write_bytes(b"\x02" * 4096)
    restart()
    assert fingerprint(str(model), False) != before


def test_linked_folders_are_keyed_and_link_loops_end(tmp_path: Path) -> None:
    """Python 3.11's rglob does not enter a linked folder (a sentence-transformers module shared between models,
    say): its files are keyed all the same, and a link back up is not followed round."""
    model = model_folder(tmp_path / "model", b"\x01" * 4096)
    pooling = tmp_path / "shared" / "1_Pooling"
    pooling.mkdir(parents=True)
    (pooling / "config.json").write_text('{"pooling_mode_cls_token": true}')
    (model / "1_Pooling").symlink_to(pooling, target_is_directory=True)
    (pooling / "model").symlink_to(model, target_is_directory=True)  # round and round
    (model / "itself").symlink_to(".", target_is_directory=True)
    before = fingerprint(str(model), False)
    (pooling / "config.json").write_text('{"pooling_mode_cls_token": false}')
    restart()
    assert fingerprint(str(model), False) != before


def broken_entry(store: ConvertedModels, key: str) -> Path:
    store.save(key, graph())
    (store.path(key) / "model.xml").write_text("<net> cut short")
    return store.path(key)


def other_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process runs as another user than the one who wrote the cache."""
    uid = os.getuid() + 4242
    monkeypatch.setattr(os, "getuid", lambda: uid)


def test_a_broken_entry_another_user_wrote_is_left_and_named(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's entry may serve that user's replicas, and this one cannot remove it: a failed read leaves it,
    and the save that cannot replace it says where it is and what to do, instead of every start converting again
    with no sign why."""
    store = ConvertedModels(str(tmp_path), ov.Core())
    entry = broken_entry(store, "tiny-0123")
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="reranker"):
        other_user(m)
        assert store.load("tiny-0123") is None
        assert entry.is_dir()
        store.save("tiny-0123", graph())
    warned = [r for r in caplog.records if r.getMessage().startswith("a broken conversion cache entry is in the way")]
    assert [r.getMessage() for r in warned] == [
        "a broken conversion cache entry is in the way and cannot be replaced; every start converts again until "
        "its owner (or root) removes it"]
    assert vars(warned[0])["cache"] == str(entry) and vars(warned[0])["owner_uid"] == os.getuid()
    assert [p.name for p in store.root.iterdir()] == ["tiny-0123"]  # no staging left


def test_a_broken_entry_this_user_wrote_is_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ConvertedModels(str(tmp_path), ov.Core())
    broken_entry(store, "tiny-0123")
    with caplog.at_level(logging.WARNING, logger="reranker"):
        store.save("tiny-0123", graph())  # another process's save found it first, say
    assert store.load("tiny-0123") is not None and caplog.messages == []
    broken_entry(store, "tiny-0123")
    assert store.load("tiny-0123") is None and not store.path("tiny-0123").exists()
    assert caplog.messages == ["a cached converted model could not be read; removed, converting again"]
    assert [p.name for p in store.root.iterdir()] == []


def test_the_service_keys_its_model_with_the_digests_its_cache_remembers(bert_dir: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from reranker.loading import load_model
    from tests.conftest import model_settings

    monkeypatch.setattr("reranker.backends.keys.RECENT_SECONDS", 0.0)
    load_model(model_settings(bert_dir, backend="openvino", cache_dir=str(tmp_path)))
    memos = [memo.read_text() for memo in (tmp_path / "file-digests").iterdir()]
    # The model folder's, and the converted entry's: the graph's files as the save hashed them.
    assert sorted(str(bert_dir.resolve()) in memo for memo in memos) == [False, True]
    restart()
    read = hashes(monkeypatch)
    load_model(model_settings(bert_dir, backend="openvino", cache_dir=str(tmp_path)))
    assert read == []  # a restart reads none of the model's files to key it, nor the graph's to check it


def aged(entry: Path, days: float, *names: str) -> None:
    when = time.time() - days * 86400
    for name in names:
        os.utime(entry / name, (when, when))


def test_entries_no_start_took_for_the_max_age_go_when_a_model_is_added(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys change with every library upgrade, so old entries would pile up for ever: a save removes this user's
    entries no start has taken for RERANKER_CACHE_MAX_AGE_DAYS, and only those. Taking an entry marks it, an
    entry from before the marker counts from its meta.json (and gets a marker when taken), another user's entry
    is left."""
    store = ConvertedModels(str(tmp_path), ov.Core(), max_age_days=30)
    for key in ("unused-1", "taken-2", "legacy-3", "legacy-taken-4", "recent-5"):
        store.save(key, graph())
    aged(store.path("unused-1"), 31, "last-used")
    aged(store.path("taken-2"), 31, "last-used")
    assert store.load("taken-2") is not None
    for key in ("legacy-3", "legacy-taken-4"):
        (store.path(key) / "last-used").unlink()
        aged(store.path(key), 31, "meta.json")
    assert store.load("legacy-taken-4") is not None
    aged(store.path("recent-5"), 29, "last-used")
    with monkeypatch.context() as m:
        other_user(m)  # every entry is another user's: none is removed
        store.save("theirs-6", graph())
    assert len(list(store.root.iterdir())) == 6
    with caplog.at_level(logging.INFO, logger="reranker"):
        store.save("new-7", graph())
    assert sorted(p.name for p in store.root.iterdir()) == [
        "legacy-taken-4", "new-7", "recent-5", "taken-2", "theirs-6"]
    removed = [r for r in caplog.records if r.getMessage().startswith("removed a converted model")]
    assert sorted(vars(r)["cache"] for r in removed) == [str(store.path("legacy-3")), str(store.path("unused-1"))]
    assert all(vars(r)["mib"] >= 0 and vars(r)["max_age_days"] == 30 for r in removed)


def test_nothing_but_the_caches_own_entries_and_staging_is_ever_removed(tmp_path: Path) -> None:
    """RERANKER_CACHE_DIR may name a folder that holds other things (`~` makes `~/openvino` the cache's): an OpenVINO
    checkout there lost its .git to the stale-staging sweep, and an old folder with a meta.json to the age limit."""
    store = ConvertedModels(str(tmp_path), ov.Core(), max_age_days=30)
    store.root.mkdir(parents=True)
    (store.root / ".git" / "objects").mkdir(parents=True)
    (store.root / ".gitignore").write_text("*.pyc\n")
    (store.root / "docs_old").mkdir()
    (store.root / "docs_old" / "meta.json").write_text('{"title": "old docs"}')
    store.save("mine-0123", graph())
    (store.root / ".mine-4567-0123456789ab").mkdir()  # a save killed part-way: the cache's own staging
    hours_ago = time.time() - STALE_SECONDS - 60
    for path in (".git", ".git/objects", ".gitignore", ".mine-4567-0123456789ab"):
        os.utime(store.root / path, (hours_ago, hours_ago))
    aged(store.root / "docs_old", 400, "meta.json")
    aged(store.path("mine-0123"), 31, "last-used")
    store.save("new-89ab", graph())
    assert sorted(p.name for p in store.root.iterdir()) == [".git", ".gitignore", "docs_old", "new-89ab"]
    assert (store.root / ".git" / "objects").is_dir()


def test_a_max_age_of_zero_keeps_every_entry(tmp_path: Path) -> None:
    store = ConvertedModels(str(tmp_path), ov.Core(), max_age_days=0)
    store.save("old-1", graph())
    aged(store.path("old-1"), 3650, "last-used", "meta.json")
    store.save("new-2", graph())
    assert sorted(p.name for p in store.root.iterdir()) == ["new-2", "old-1"]


def test_the_service_removes_what_its_max_age_says_when_it_converts(bert_dir: Path, tmp_path: Path) -> None:
    from reranker.loading import load_model
    from tests.conftest import model_settings

    old = ConvertedModels(str(tmp_path), ov.Core())
    old.save("upgraded-away-0123", graph())
    aged(old.path("upgraded-away-0123"), 8, "last-used")
    load_model(model_settings(bert_dir, backend="openvino", cache_dir=str(tmp_path), cache_max_age_days=10))
    assert old.path("upgraded-away-0123").is_dir()  # 8 days < 10
    kept = {p.name for p in old.root.iterdir()}
    load_model(model_settings(bert_dir, backend="openvino", cache_dir=str(tmp_path), cache_max_age_days=7,
                              dtype="int8", int8_mode="weights", int8_min_spearman=-1.0))  # stores its int8 copy
    now = {p.name for p in old.root.iterdir()}
    assert len(now - kept) == 1 and kept - now == {"upgraded-away-0123"}  # the int8 copy in, the unused entry out
