"""mathtune's cache of converted GGUF files: where a file's copy lives, and converting it once.

    folder, was_cached = convert_gguf(path, cache_root(cfg.model.cache_dir))
    cache_folder(path, cache_root(None))     # where that copy is, converted or not

(`mathtune models --cache` lists the copies and `--remove` deletes one: mathtune/model/lmstudio.py.)

A copy is keyed by the GGUF file's fingerprint (size, first and last MiB, transformers' version), so a
changed or re-downloaded file is converted again and an unchanged one never is.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from mathtune.model.convert import ConversionPlan, convert, damage, plan_conversion

log = logging.getLogger(__name__)


def convert_gguf(gguf_path: Path, cache: Path, plan: ConversionPlan | None = None) -> tuple[str, bool]:
    """A plain Transformers copy of a GGUF file in the cache; returns (folder, was it cached).

    One process converts while any other asking for the same file waits for it (an OS lock on the
    entry, released by the kernel if the process dies); a damaged entry is converted again."""
    from filelock import FileLock, Timeout

    folder = cache_folder(gguf_path, cache)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("Another mathtune process is converting %s into %s; waiting for it", gguf_path.name, folder)
        lock.acquire()
    try:
        if (folder / "config.json").is_file():
            problem = damage(folder)
            if problem is None:
                return str(folder), True
            log.warning("The cached conversion %s is damaged (%s): converting %s again", folder, problem, gguf_path)
            shutil.rmtree(folder)
        plan = plan or plan_conversion(gguf_path)
        _warn_if_short_of_memory(gguf_path, plan.ram_bytes)
        log.info("%s; converting once, cached in %s", plan.describe(), folder)
        convert(plan, folder)
        return str(folder), False
    finally:
        lock.release()


def cache_folder(gguf_path: Path, cache: Path) -> Path:
    return cache / "gguf" / f"{gguf_path.stem}-{gguf_fingerprint(gguf_path)}"


def gguf_fingerprint(path: Path) -> str:
    """Identity of a GGUF file from its size and first and last MiB (the header holds all metadata)."""
    import transformers

    size = path.stat().st_size
    digest = hashlib.sha256(f"{size}:{transformers.__version__}".encode())
    with path.open("rb") as fh:
        digest.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        digest.update(fh.read())
    return digest.hexdigest()[:16]


def _warn_if_short_of_memory(path: Path, need: int) -> None:
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if need > available:
        log.warning("Converting %s needs about %.1f GB of RAM and %.1f GB are free: it may be killed by the "
                    "system. Close other programs or convert on a machine with more memory (once: the result is "
                    "cached).", path.name, need / 1e9, available / 1e9)


