"""embtables.atomic: whole-or-nothing files and directories, and the cleanup of killed writers' temporaries."""
import json
import os
import subprocess
import sys

import pytest

from embtables import atomic


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path, monkeypatch, exchange):
    if not exchange:  # filesystems without renameat2 RENAME_EXCHANGE: two renames
        monkeypatch.setattr(atomic, "_exchange", None)
    out = tmp_path / "d"
    with atomic.atomic_dir(out) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_dir(out, replaceable=lambda p: True) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("killed")
    assert (out / "a").read_text() == "old" and siblings(out) == []
    with atomic.atomic_dir(out, replaceable=lambda p: True) as tmp:
        (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "new" and siblings(out) == []
    with pytest.raises(FileExistsError, match="refusing to overwrite"), atomic.atomic_dir(out) as tmp:
        pass  # not replaceable: refused before any work
    with atomic.atomic_dir(out, replaceable=lambda p: True, keep_existing=True) as tmp:
        (tmp / "a").write_text("late")  # a concurrent builder finished first: theirs is kept
    assert (out / "a").read_text() == "new" and siblings(out) == []


def test_clean_stale_removes_dead_writers_temporaries_and_restores_a_parked_old(tmp_path):
    pid = dead_pid()
    out = tmp_path / "d"
    parked = tmp_path / f".d.old-{pid}-0123abcd"  # killed between the two renames of a swap
    parked.mkdir()
    (parked / "a").write_text("previous")
    (tmp_path / f".d.building-{pid}-4567abcd").mkdir()
    (tmp_path / f".d.tmp-{pid}-89abcdef").write_text("{")
    live = tmp_path / f".d.building-{os.getpid()}-0000abcd"
    live.mkdir()
    (tmp_path / ".d.notes").write_text("not ours")  # not a temporary's name: left alone
    removed = atomic.clean_stale(out)
    assert (out / "a").read_text() == "previous"
    assert sorted(p.name for p in removed) == [f".d.building-{pid}-4567abcd", f".d.tmp-{pid}-89abcdef"]
    assert siblings(out) == sorted([live.name, ".d.notes"])


def test_temporaries_reads_the_one_naming_of_any_output_or_one(tmp_path):
    """What clean_stale (beside one output) and a run's lock (a whole folder) both read."""
    for name in (".metrics.json.tmp-12-0123abcd", ".d.building-34-4567abcd", ".d.x.tmp-5-89abcdef",
                 ".d.notes", "d.tmp-1-0123abcd", ".d.tmp-1-0123"):
        (tmp_path / name).write_text("")
    assert [(p.name, tag, pid) for p, tag, pid in atomic.temporaries(tmp_path)] == [
        (".d.building-34-4567abcd", "building", 34), (".d.x.tmp-5-89abcdef", "tmp", 5),
        (".metrics.json.tmp-12-0123abcd", "tmp", 12)]
    assert [p.name for p, _, _ in atomic.temporaries(tmp_path, "d")] == [".d.building-34-4567abcd"]
    assert atomic.temporaries(tmp_path / "missing") == []


def test_write_json_atomic_cleans_and_leaves_nothing(tmp_path):
    path = tmp_path / "m.json"
    (tmp_path / f".m.json.tmp-{dead_pid()}-deadbeef").write_text("{")
    atomic.write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic.write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1} and siblings(path) == []
