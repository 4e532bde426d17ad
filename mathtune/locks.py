"""One mathtune process at a time per run folder and per export output.

    mathtune train --output runs/x ...     # a second `train --output runs/x`, `--resume runs/x` or a UI
    mathtune export runs/x --to gguf       # double-click is refused, naming the PID of the first

The lock is an operating-system lock (the `filelock` package: flock on Linux and macOS, LockFileEx
on Windows) on a hidden file: `RUN_DIR/.mathtune.lock` for a run; for an export output, a file
named after the output's full path in mathtune's cache (`~/.cache/mathtune/locks/`), so that nothing
but the output lands in the folder it is written to (LM Studio's models folder, for one).
The kernel releases it when its process ends, however it ends, so a `kill -9` or a power cut never
leaves a stale lock behind. The holder writes its PID and command beside it (`.owner`) so that the
refusal can say who holds the folder.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from mathtune.errors import MathtuneError
from mathtune.files import cache_root

log = logging.getLogger("mathtune")

RUN_LOCK = ".mathtune.lock"
OWNER_SUFFIX = ".owner"


class InUseError(MathtuneError):
    """Another process holds the lock; the message names its PID."""


class Lock:
    """A held lock; `release()` (or the end of the process) frees it."""

    def __init__(self, lock_file: Path):
        self.lock_file = lock_file
        self.owner_file = lock_file.with_name(lock_file.name + OWNER_SUFFIX)
        self.count = 0
        self._lock = None

    def release(self) -> None:
        self.count -= 1
        if self.count > 0:
            return
        _HELD.pop(_key(self.lock_file), None)  # released by the thread that took it
        if self._lock is not None:
            self.owner_file.unlink(missing_ok=True)
            self._lock.release()


# Per thread: the UI runs exports in threads, and a second export into the same output from another
# thread must be refused like one from another process (each thread opens the lock file itself).
_HELD: dict[tuple[int, str], Lock] = {}
_LOCAL = threading.local()


def _scopes() -> list[list[Lock]]:
    if not hasattr(_LOCAL, "scopes"):
        _LOCAL.scopes = []
    return _LOCAL.scopes


RUN_LOCK_FILES = frozenset({RUN_LOCK, RUN_LOCK + OWNER_SUFFIX})
"""What the lock leaves in a run folder: not part of the run."""


def lock_run_dir(run_dir: Path) -> Lock:
    return acquire(Path(run_dir) / RUN_LOCK, f"{run_dir}: the run folder")


def lock_output(out: Path) -> Lock:
    import hashlib

    folder = cache_root(None) / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:24]
    return acquire(folder / f"{out.name}-{key}.lock", f"{out}")


def acquire(lock_file: Path, what: str) -> Lock:
    """Take the lock at `lock_file` for this process (again, if it already holds it), or raise
    InUseError naming the process that holds it. Never waits."""
    from filelock import FileLock, Timeout

    held = _HELD.get(_key(lock_file))
    if held is None:
        held = Lock(lock_file)
        # thread_local=False: the lock belongs to the process (Trainer callbacks run in other threads).
        candidate = FileLock(str(lock_file), timeout=0, thread_local=False)
        try:
            candidate.acquire()
        except Timeout:
            raise InUseError(f"{what} is in use by another mathtune {_who(held.owner_file)}. Wait for it to finish or "
                             "stop it; two writers there would mix their files.") from None
        except (NotImplementedError, OSError) as exc:
            # A file system without locks (some network mounts): go on, as before locks existed.
            log.warning("Could not lock %s (%s); make sure no other mathtune process writes there", lock_file, exc)
        else:
            held._lock = candidate
            held.owner_file.write_text(json.dumps({"pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                   "command": " ".join(sys.argv)}), encoding="utf-8")
        _HELD[_key(lock_file)] = held
    held.count += 1
    if _scopes():
        _scopes()[-1].append(held)
    return held


@contextmanager
def released_at_exit():
    """Locks taken inside the block are released when it ends (a run's folder lock: held until the
    run is over, evaluation and report included)."""
    _scopes().append([])
    try:
        yield
    finally:
        for held in reversed(_scopes().pop()):
            held.release()


def _who(owner_file: Path) -> str:
    try:
        owner = json.loads(owner_file.read_text(encoding="utf-8"))
        where = "job of this process" if owner["pid"] == os.getpid() else "process"
        return f"{where} (PID {owner['pid']}, since {owner['since']}: {owner['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "process (PID unknown: it is starting or stopping)"


def _key(lock_file: Path) -> tuple[int, str]:
    return threading.get_ident(), os.path.normcase(os.path.abspath(lock_file))
