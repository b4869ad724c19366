"""Guards the durable-write helpers of util.py: sync_tree's fsyncs, write_json_atomic and replace_directory
(fsync before the rename, parent after, no temporary left), and remove_stale_temporaries (removes what a
killed run left, with a line each, and nothing else)."""

import json
import os
from pathlib import Path

import pytest

import util


@pytest.fixture
def synced(monkeypatch) -> list:
    """The paths fsync'ed (and the renames done), in order, while the test runs."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source, target):
        events.append(("rename", Path(source), Path(target)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_sync_tree_syncs_every_file_and_folder_then_the_parent(tmp_path, synced):
    tree = tmp_path / "model"
    (tree / "sub").mkdir(parents=True)
    (tree / "config.json").write_text("{}")
    (tree / "sub" / "shard.bin").write_bytes(b"x")
    (tree / "link").symlink_to("/etc/hostname")
    util.sync_tree(tree)
    assert set(synced) == {tree, tree / "sub", tree / "config.json", tree / "sub" / "shard.bin", tmp_path}
    assert synced[-1] == tmp_path and len(synced) == 5  # the link is skipped, the parent comes last
    synced.clear()
    util.sync_tree(tree / "config.json")
    assert synced == [tree / "config.json", tree]


def test_write_json_atomic_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, synced):
    target = tmp_path / "run_state.json"
    util.write_json_atomic(target, {"init": 1})
    temporary, rename, folder = synced
    assert temporary.parent == tmp_path and temporary.name.startswith(".run_state.json.tmp-")
    assert rename == ("rename", temporary, target) and folder == tmp_path
    assert json.loads(target.read_text()) == {"init": 1} and oct(target.stat().st_mode & 0o777) == "0o644"
    with pytest.raises(TypeError):
        util.write_json_atomic(target, {"init": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["run_state.json"]  # no temporary left
    assert json.loads(target.read_text()) == {"init": 1}


def test_replace_directory_syncs_the_new_folder_before_the_rename(tmp_path, synced):
    final = tmp_path / "published"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with util.atomic_directory(final) as tmp:
        (tmp / "new.txt").write_text("new")
    renames = [i for i, event in enumerate(synced) if isinstance(event, tuple)]
    assert synced[renames[1]] == ("rename", tmp, final)
    assert {tmp, tmp / "new.txt"} <= set(synced[: renames[0]])  # synced before anything moved
    assert synced[renames[1] + 1 :] == [tmp_path]  # the parent, after the rename
    assert [p.name for p in final.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["published"]


def test_remove_stale_temporaries_removes_only_what_a_killed_run_left(tmp_path, capsys):
    leftovers = [tmp_path / ".prep.tmp-a1b2", tmp_path / ".train-llama.old-4242", tmp_path / ".run_state.json.tmp-x"]
    leftovers[0].mkdir()
    (leftovers[0] / "data.arrow").write_bytes(b"half")
    leftovers[1].mkdir()
    leftovers[2].write_text("{")
    kept = ["prep", "notes.tmp-1", ".cache", "run_state.json", "x.old-3"]
    for name in kept:
        (tmp_path / name).mkdir()
    (tmp_path / "prep" / ".deep.tmp-1").mkdir()  # only the folder's own entries are looked at
    assert util.remove_stale_temporaries(tmp_path) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert (tmp_path / "prep" / ".deep.tmp-1").is_dir()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"removed a temporary folder left by an interrupted run: {leftovers[0]}",
        f"removed a temporary file left by an interrupted run: {leftovers[2]}",
        f"removed a temporary folder left by an interrupted run: {leftovers[1]}",
    ]
    assert util.remove_stale_temporaries(tmp_path / "missing") == []
