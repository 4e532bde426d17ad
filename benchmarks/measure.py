"""What the benchmarks measure of a child process from outside."""

from __future__ import annotations

import os
import subprocess
import sys


def wait_with_peak_rss(proc: subprocess.Popen) -> int | None:
    """Wait for `proc` (setting its returncode) and return its peak resident memory in bytes, the
    kernel's (wait4: the child and the children it waited for); None where there is no wait4 (Windows)."""
    if not hasattr(os, "wait4"):
        proc.wait()
        return None
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def gigabytes(size: int | None) -> str:
    """A memory size for a table: GB with two decimals, n/a where it was not measured."""
    return "n/a" if size is None else f"{size / 1e9:.2f}"
