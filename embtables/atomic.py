"""Atomic files and directories: built under a hidden sibling name, renamed in when complete.

A crash at any point leaves either the previous state or the complete new one. Temporaries
are named `.NAME.TAG-PID-RANDOM` (`temporaries` finds them), so the next writer of the same path
tells a stale one (its process is dead) from one a live process is still building, and removes it
(`clean_stale`); a training run's lock removes its own regardless of pid
(pipelines/train/run_lock.py). Every writer of the project (datasets, exports, predictions,
checkpoints, JSON files) uses this module, so there is one way to write and one way to clean up.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, ContextManager, Iterator

_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<tag>[a-z]+)-(?P<pid>\d+)-[0-9a-f]{8}")


def temp_sibling(path: str | Path, tag: str) -> Path:
    """A fresh hidden name beside `path` (same filesystem, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove(path: Path) -> None:
    """Delete a file or a directory tree; already gone is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def temporaries(folder: str | Path, name: str | None = None) -> list[tuple[Path, str, int]]:
    """This module's temporaries in `folder` (of the output `name`, or of any): (path, tag,
    writer pid), in name order. A missing or unreadable folder has none."""
    try:
        entries = sorted(Path(folder).iterdir())
    except OSError:
        return []
    found = []
    for p in entries:
        m = _TEMP.fullmatch(p.name)
        if m is not None and name in (None, m["name"]):
            found.append((p, m["tag"], int(m["pid"])))
    return found


def clean_stale(path: str | Path) -> list[Path]:
    """Remove the temporaries beside `path` that a dead process left; returns what it removed.

    A stale `old` temporary is the previous version of `path` caught between the two renames
    of a swap (filesystems without an atomic exchange): when `path` is missing it is put back.
    """
    path = Path(path)
    removed = []
    for p, tag, pid in temporaries(path.parent, path.name):
        if _alive(pid):
            continue
        if tag == "old" and not os.path.lexists(path):
            os.replace(p, path)
            continue
        remove(p)
        removed.append(p)
    return removed


# ---------------------------------------------------------------- files

@contextlib.contextmanager
def atomic_file(path: str | Path, tag: str = "writing") -> Iterator[Path]:
    """Yield a temp path to write; on success it is synced and renamed to `path`, else deleted."""
    path = Path(path)
    clean_stale(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path, tag)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        remove(tmp)


def write_json_atomic(path: str | Path, obj, *, indent: int = 1, sort_keys: bool = False,
                      default: Callable | None = None) -> None:
    """JSON written whole or not at all: readers never see a partial file."""
    with atomic_file(path, "tmp") as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort: not every filesystem lets a directory be synced)."""
    with contextlib.suppress(OSError):
        _fsync(path)


# ---------------------------------------------------------------- directories

@contextlib.contextmanager
def atomic_dir(out: str | Path, *, replaceable: Callable[[Path], bool] = lambda p: False,
               keep_existing: bool = False, guard: Callable[[Path], ContextManager] | None = None,
               what: str = "something this command may replace") -> Iterator[Path]:
    """Yield a hidden sibling dir to build in; on success it becomes `out`, on failure it is deleted.

    An existing `out` is replaced only if `replaceable(out)` (or it is an empty dir); else this
    raises FileExistsError naming it (before any work, and again at the swap). With
    `keep_existing`, an `out` that appeared meanwhile (a concurrent builder) wins and the new
    build is dropped. `guard(out)` is entered around the swap (e.g. a lock that no reader holds).
    """
    out = Path(out)
    check_replaceable(out, replaceable, what)
    clean_stale(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(out, "building")
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        if keep_existing and os.path.lexists(out):
            return
        with guard(out) if guard is not None else contextlib.nullcontext():
            if os.path.lexists(out):
                check_replaceable(out, replaceable, what)  # it may have changed while we built
                swap(tmp, out)  # tmp now holds the previous version, deleted below
            else:
                os.replace(tmp, out)
        _fsync_dir(out.parent)
    finally:
        remove(tmp)


def check_replaceable(out: Path, replaceable: Callable[[Path], bool], what: str) -> None:
    if not os.path.lexists(out):
        return
    if out.is_dir() and not out.is_symlink() and (not any(out.iterdir()) or replaceable(out)):
        return
    raise FileExistsError(f"{out} exists and is not {what}; refusing to overwrite it")


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_exchange = _renameat2()


def swap(new: Path, old: Path) -> None:
    """Atomically put directory `new` at `old`'s path; afterwards `new`'s path holds the previous one.

    Linux swaps the two in one step (renameat2 RENAME_EXCHANGE). Elsewhere it takes two renames,
    and the previous version waits under an `old` temporary that `clean_stale` restores if a
    crash comes between them.
    """
    if _exchange is not None:
        if _exchange(_AT_FDCWD, os.fsencode(new), _AT_FDCWD, os.fsencode(old), _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: no exchange here, rename twice
            raise OSError(err, os.strerror(err), str(old))
    parked = temp_sibling(old, "old")
    os.replace(old, parked)
    os.replace(new, old)
    os.replace(parked, new)
