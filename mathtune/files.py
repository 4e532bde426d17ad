"""Files in and out: why an input cannot be read, in words; results written aside, then renamed,
so that a crash never leaves a half-written file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

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
