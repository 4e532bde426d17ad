"""Files in and out: why an input cannot be read, in words; results written aside, then renamed,
so that a crash never leaves a half-written file."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from mathtune.errors import MathtuneError

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def unreadable_reason(path: Path) -> str | None:
    """Why `path` cannot be read as a file ("is a folder, not a file", "cannot be read: permission
    denied"...), or None when it can. Never opens a FIFO or a device (that could block or consume it)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "no such file"
    except NotADirectoryError:
        return "no such file (a folder on its path is a file)"
    except PermissionError:
        return "cannot be reached: permission denied on a folder of its path"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    kind = next((name for test, name in _KINDS if test(mode)), None)
    if kind is not None:
        return f"is {kind}, not a file"
    try:
        os.close(os.open(path, os.O_RDONLY))
    except PermissionError:
        return "cannot be read: permission denied (check the file's permissions and owner)"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    return None


def is_disk_full(exc: BaseException) -> bool:
    # safetensors (Rust) reports a full disk as SafetensorError with the OS message, not as OSError.
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc) or "StorageFull" in str(exc)


def free_bytes(folder: Path) -> int | None:
    """Free bytes on the file system that holds `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def no_space(out: Path, needed: int, during: bool = False) -> str:
    """The message for an output that does not fit: how much it needs and how much there is."""
    free = free_bytes(out.parent)
    what = "the disk filled up while writing it" if during else "not enough disk space"
    room = f"{_size(free)} {'is' if during else 'are'} free" if free is not None else "the free space is unknown"
    return (f"{out}: {what}: it needs about {_size(needed)} and {room} in {out.parent}; nothing was left behind. "
            "Free some space, or write elsewhere with --output.")


def _size(n: int) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def require_space(out: Path, needed: int) -> None:
    """Refuse, before writing anything, an output of `needed` bytes that the disk cannot hold."""

    free = free_bytes(out.parent)
    if free is not None and free < needed:
        raise MathtuneError(no_space(out, needed))


def write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves the previous file, and no .tmp beside it
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def cache_root(cfg_cache_dir: Path | None) -> Path:
    if cfg_cache_dir is not None:
        return Path(cfg_cache_dir).expanduser()
    return Path(os.environ.get("MATHTUNE_CACHE", Path.home() / ".cache" / "mathtune")).expanduser()


def publish(staged: Path, target: Path) -> None:
    """Flush every file of `staged` to disk, then rename it to `target` (replacing an older one).

    The older one is moved aside as `.NAME.old` until the new one is in place: a name that no
    `NAME-*` pattern matches, so a process killed in between leaves nothing that transformers'
    `sort_checkpoints` would count as a checkpoint (and rotate a real one out for)."""
    for path in sorted(staged.rglob("*")):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(staged)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staged.rename(target)
        shutil.rmtree(old)
    else:
        staged.rename(target)
    _fsync_dir(target.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename is still atomic
    finally:
        os.close(fd)
