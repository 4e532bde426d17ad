"""The run folder: what is in it, and the one check that a folder is one.

    runs/x/config.yaml  metrics.jsonl  checkpoints/  adapter/  train_summary.json  eval/  report.html

`mathtune train` picks and creates it (`choose_run_dir`, then `create_run_dir` once the model and
data are known to work); every other command starts with `require_run_dir`. A training process
holds the folder's lock (mathtune/locks.py) from the first look at it to the end of the run.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

from mathtune.errors import MathtuneError
from mathtune.files import write_text
from mathtune.locks import RUN_LOCK_FILES, lock_run_dir

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"


def trained_dtype(run_dir: Path) -> str | None:
    """The dtype the run's matrix products ran in ("bfloat16", "float32"...), from its train_summary.json
    (runs older than its "dtype" field: read from "precision"); None where the file says nothing."""
    import json
    import re

    try:
        summary = json.loads((Path(run_dir) / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    if isinstance(summary.get("dtype"), str):
        return summary["dtype"]
    found = re.search(r"\b(bfloat16|float16|float32)\b", str(summary.get("precision", "")))
    return found.group(1) if found else None


def require_run_dir(path: Path, *, finished: bool = False, why: str = "") -> Path:
    """`path` if it is a run folder (and, with `finished`, one whose training saved an adapter);
    else a MathtuneError saying what is missing. `why` ends the message ("nothing to resume")."""
    path = Path(path)
    if finished and not ((path / CONFIG).is_file() and (path / ADAPTER).is_dir()):
        raise MathtuneError(f"{path}: not a finished mathtune run (needs {CONFIG} and {ADAPTER}/){_tail(why)}")
    if not (path / CONFIG).is_file():
        raise MathtuneError(f"{path}: not a mathtune run folder (no {CONFIG}){_tail(why)}")
    return path


def choose_run_dir(out_dir: Path | None, resume: bool, overwrite: bool) -> Path:
    """The folder this run will write (`runs/<date>-<time>` when none is named), checked but not
    touched: a non-empty folder is never reused for a new run without `overwrite`, so a finished run
    cannot be destroyed by starting another one with the same name."""
    run_dir = Path(out_dir) if out_dir is not None else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if resume:
        require_run_dir(run_dir, why="nothing to resume")
        lock_run_dir(run_dir)  # another process training here is refused, with its PID, before anything else
        return run_dir
    if run_dir.exists() and _run_files(run_dir):
        if overwrite or (run_dir / CONFIG).is_file():
            lock_run_dir(run_dir)  # the same for a run folder (a folder of something else is left untouched)
        if not overwrite:
            raise MathtuneError(f"{run_dir}: the run folder exists and is not empty. Choose another with --output, "
                                "continue it with --resume, or replace it with --overwrite.")
    return run_dir


def create_run_dir(run_dir: Path, config_text: str, resume: bool) -> None:
    """Empty (an overwritten run's folder) and create `run_dir`, and save the resolved config in it.
    A resumed run keeps its folder; its config.yaml takes the settings that may change on resume."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_run_dir(run_dir)  # two new runs that chose the same name: the second stops here
    if resume:
        if (run_dir / CONFIG).read_text(encoding="utf-8") != config_text:
            write_text(run_dir / CONFIG, config_text)  # the settings allowed to change on resume (config.RESUMABLE)
        return
    for path in _run_files(run_dir):  # choose_run_dir allowed it: output.overwrite. The lock stays.
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    write_text(run_dir / CONFIG, config_text)


def _run_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.name not in RUN_LOCK_FILES]


def _tail(why: str) -> str:
    return f"; {why}" if why else ""
