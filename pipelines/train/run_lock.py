"""One writer per run dir: an advisory lock (flock on RUN/run.lock) held for the whole training.

The kernel drops a flock when its process dies, however it dies, so a lock left by a killed run
never blocks the next command. Whoever holds the lock is the only writer, so any temporary it
finds (a half-written checkpoint or file of a killed process) is stale and is removed.
"""
from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from embtables.errors import EmbtablesError

LOCK_FILE = "run.lock"
# Where a training writes temporaries: the run, its checkpoints, and OptEmbed's stage dirs.
TEMP_DIRS = (".", "checkpoints", "supernet", "supernet/checkpoints", "search")
TEMP_PATTERNS = (".tmp-step-*", ".*.tmp-*")


@contextmanager
def run_lock(run_dir: Path):
    run_dir = Path(run_dir)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            raise EmbtablesError(f"{run_dir} is in use by another training (pid {holder}); "
                                 "wait for it to end or pick another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        remove_stale_temporaries(run_dir)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiting process)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Temporaries of killed processes (call only while holding the lock)."""
    removed = []
    for sub in TEMP_DIRS:
        for pattern in TEMP_PATTERNS:
            for path in (Path(run_dir) / sub).glob(pattern):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed
