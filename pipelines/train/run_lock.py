"""One writer per run dir: an advisory lock (flock on RUN/run.lock) held for the whole training.

The kernel drops a flock when its process dies, however it dies, so a lock left by a killed run
never blocks the next command. Whoever holds the lock is the only writer, so any temporary it
finds (a half-written checkpoint or file of a killed process) is stale and is removed: training
does it for the whole run (`run_lock`), and commands that read a run (eval, export) do it when
no training holds the lock (`clean_run`). Temporaries beside a single output path (exports,
predictions, datasets) are cleaned by their writer through embtables.atomic.clean_stale, which
reads the same names (embtables.atomic.temporaries) but asks whether the writer's pid is alive.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from embtables.atomic import remove, temporaries
from embtables.errors import EmbtablesError
from embtables.pipelines.train.checkpoint import TEMP_PREFIX

LOCK_FILE = "run.lock"
# Where a training writes temporaries: the run, its checkpoints, and OptEmbed's stage dirs.
TEMP_DIRS = (".", "checkpoints", "supernet", "supernet/checkpoints", "search")
TRAINING_TAGS = ("tmp", "writing")  # embtables.atomic's JSON files and atomic_file outputs


@contextmanager
def run_lock(run_dir: Path):
    """Held for a whole training; the run's stale temporaries are removed first."""
    with _exclusive(Path(run_dir)):
        remove_stale_temporaries(run_dir)
        yield


def clean_run(run_dir: Path) -> list[Path]:
    """For commands that read a run (eval, export): remove its stale temporaries unless a
    training holds the lock (then they are live). The lock is held only while cleaning."""
    try:
        with _exclusive(Path(run_dir)):
            return remove_stale_temporaries(run_dir)
    except (EmbtablesError, OSError):  # a training runs, or the run is read-only: leave everything
        return []


@contextmanager
def _exclusive(run_dir: Path):
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
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiting process)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Temporaries of killed processes (call only while holding the lock): checkpoints being
    written and atomic files, whatever their pid (the lock says no training writes, and a rank
    on another node has a pid that means nothing here)."""
    removed = []
    for sub in TEMP_DIRS:
        folder = Path(run_dir) / sub
        stale = sorted(folder.glob(f"{TEMP_PREFIX}*"))
        stale += [path for path, tag, _ in temporaries(folder) if tag in TRAINING_TAGS]
        for path in stale:
            remove(path)
            removed.append(path)
    return removed
