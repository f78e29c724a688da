"""History store rotation: keeps the newest `keep`, atomic, never deletes a referenced checkpoint."""

import pytest

from soup_megatron.history.base import pick_versions
from soup_megatron.history.store import CheckpointStore, HistoryError


def writer(tag):
    def write(tmp):
        (tmp / "weights.txt").write_text(str(tag))
    return write


def test_rotation_keeps_newest(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for v in (0, 10, 20, 30):
        store.add(v, writer(v))
    assert store.members() == [20, 30]
    assert store.on_disk() == [20, 30]
    assert not store.path(0).exists() and not store.path(10).exists()
    assert (store.path(30) / "weights.txt").read_text() == "30"
    reopened = CheckpointStore(tmp_path, keep=2)  # the manifest on disk is the truth
    assert reopened.members() == [20, 30]


def test_pinned_checkpoint_survives_rotation_until_unpinned(tmp_path):
    store = CheckpointStore(tmp_path, keep=1)
    store.add(0, writer(0))
    store.pin("prefix-3", [0])  # a cached prefix / generation in flight reads version 0
    store.add(10, writer(10))
    store.add(20, writer(20))
    assert store.members() == [20]
    assert store.path(0).is_dir(), "a referenced checkpoint must not be deleted"
    assert not store.path(10).exists()
    store.unpin("prefix-3")
    assert not store.path(0).exists()


def test_pin_unknown_version_is_refused(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    store.add(0, writer(0))
    with pytest.raises(HistoryError, match="not in the store"):
        store.pin("x", [5])


def test_crash_mid_write_leaves_no_member(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    store.add(0, writer(0))

    def crash(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        store.add(10, crash)
    assert store.members() == [0]
    assert not store.path(10).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
    assert CheckpointStore(tmp_path, keep=2).members() == [0]


def test_versions_must_increase(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    store.add(10, writer(10))
    with pytest.raises(HistoryError, match="not newer"):
        store.add(10, writer(10))


def test_restore_to_a_resumed_view(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for v in (0, 10, 20):
        store.pin("trainer-checkpoint", store.members() or [])
        store.add(v, writer(v))
    # the run resumes from a checkpoint taken when the pool was [0, 10]: 20 is redone, 0 is back
    store.restore([0, 10])
    assert store.members() == [0, 10]
    assert not store.path(20).exists()
    with pytest.raises(HistoryError, match="missing on disk"):
        CheckpointStore(tmp_path, keep=2).restore([0, 30])


def test_manifest_naming_a_missing_folder_is_an_error(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    store.add(0, writer(0))
    (store.path(0) / "weights.txt").unlink()
    store.path(0).rmdir()
    with pytest.raises(HistoryError, match="lists version 0"):
        CheckpointStore(tmp_path, keep=2)


def test_pick_rules():
    import random
    assert pick_versions([0, 10, 20], 3, "newest", random.Random(0)) == [20, 20, 20]
    assert pick_versions([0, 10, 20], 2, "oldest", random.Random(0)) == [0, 0]
    picks = pick_versions([0, 10, 20], 300, "uniform", random.Random(0))
    assert set(picks) == {0, 10, 20}
    with pytest.raises(ValueError, match="empty"):
        pick_versions([], 1, "uniform", random.Random(0))
