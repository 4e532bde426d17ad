"""The run folder: what is in it, and the one check that a folder is one.

    runs/x/config.yaml  metrics.jsonl  checkpoints/  adapter/  train_summary.json  eval/  bench/  plots/
           report.html  export/

`mathtune train` picks and creates it (`choose_run_dir`, then `create_run_dir` once the model and
data are known to work); every other command starts with `require_run_dir`. A training process
holds the folder's lock (mathtune/locks.py) from the first look at it to the end of the run.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mathtune.config import Config, flatten, load_config
from mathtune.errors import MathtuneError
from mathtune.files import write_text
from mathtune.hardware import reload_dtype
from mathtune.locks import RUN_LOCK_FILES, lock_run_dir
from mathtune.model.load import ensure_pad_token, load_model

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("mathtune")

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"
EVAL = "eval"
"""the held-out evaluation: summary.json, predictions.jsonl"""
BENCH = "bench"
"""one folder per benchmark scored (`mathtune eval --bench`)"""
PLOTS = "plots"
REPORT = "report.html"
EXPORT = "export"
"""what `mathtune export` writes, unless told elsewhere"""


def trained_dtype(run_dir: Path) -> str | None:
    """The dtype the run's matrix products ran in ("bfloat16", "float32"...), from its train_summary.json
    (runs older than its "dtype" field: read from "precision"); None where the file says nothing."""
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
            write_text(run_dir / CONFIG, config_text)  # the settings allowed to change on resume (RESUMABLE)
        return
    for path in _run_files(run_dir):  # choose_run_dir allowed it: output.overwrite. The lock stays.
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    write_text(run_dir / CONFIG, config_text)


def _run_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.iterdir() if p.name not in RUN_LOCK_FILES]


def _tail(why: str) -> str:
    return f"; {why}" if why else ""


def load_trained(run_dir: Path, cfg) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """A run's base model with its adapter on top, and the tokenizer saved beside the adapter
    (`mathtune eval`, `chat` and `export --to hf`)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    base, _, _ = load_model(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / ADAPTER)
    ensure_pad_token(tokenizer)
    return PeftModel.from_pretrained(base, run_dir / ADAPTER), tokenizer


def load_run_config(run_dir: Path) -> Config:
    """The configuration a finished run was trained with (RUN_DIR/config.yaml beside RUN_DIR/adapter/).
    The environment is not read: the run's settings are what they were. `model.dtype: auto` becomes
    the dtype the run trained in (train_summary.json), so that eval, chat and the exports reload the
    model the run measured, on this machine or another (hardware.reload_dtype says when it cannot)."""
    cfg = load_config(require_run_dir(run_dir, finished=True) / CONFIG, environ={})
    trained = trained_dtype(run_dir) if cfg.model.dtype == "auto" else None
    if trained is None:
        return cfg
    dtype, why = reload_dtype(trained, cfg.model.device)
    if why:
        log.warning("%s: %s", run_dir, why)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"dtype": dtype})})


# What a run that starts from an earlier run's adapter (--init-from) takes from that run, unless given
# again: the base the adapter was trained on, and the same data and seed, so that the held-out split
# is the earlier run's and neither run trains on the other's held-out problems. (data.preference is
# the method's: DPO reads pairs where SFT read the chosen side.)
INHERITED = ("model.path", "model.chat_template", "model.dtype", "model.load_in_4bit", "model.trust_remote_code",
             "data.*", "train.seed")


def init_from_settings(run_dir: Path) -> dict[str, Any]:
    """The dotted settings a run started from `run_dir`'s adapter takes from it (INHERITED), with
    model.adapter set to that adapter."""
    saved = load_config(require_run_dir(run_dir, finished=True, why="--init-from starts from its adapter") / CONFIG,
                        environ={}, check_machine=False)
    settings = {key: value for key, value in flatten(saved.model_dump(mode="json")).items()
                if _listed(key, INHERITED) and key != "data.preference"}
    return {**settings, "model.adapter": str(run_dir / ADAPTER)}


# Settings that may differ between a run and its --resume, and why; every other difference is refused,
# since it would mix two different trainings in one run folder (or fail deep inside PEFT).
RESUMABLE = {
    "train.max_steps": "train longer (or stop sooner) than first planned; the schedule follows the new total",
    "train.epochs": "the same, for runs that train by epochs",
    "train.save_steps": "when checkpoints are written, not what is learned",
    "train.save_total_limit": "how many checkpoints are kept",
    "train.logging_steps": "how often the loss is logged",
    "train.eval_steps": "evaluation during training reads the weights, it does not change them",
    "train.eval_batch_size": "the same",
    "eval.*": "the evaluation after training reads the weights, it does not change them",
    "data.num_proc": "tokenization processes give the same tokens",
    "data.max_errors": "how many bad records are listed",
    "model.device": "the training goes on where it is run (a fixed CUDA install: the GPU)",
    "model.cache_dir": "where a GGUF conversion is cached, not which model",
    "output.dir": "the run folder may be named by another path, or moved",
    "output.overwrite": "unused when resuming",
}


def resume_changes(saved: Config, new: Config) -> tuple[list[str], list[str]]:
    """The settings that differ between a run's saved config and the one it is resumed with, as
    'key: saved -> new' lines: (those RESUMABLE allows, the others)."""
    before, after = flatten(saved.model_dump(mode="json")), flatten(new.model_dump(mode="json"))
    allowed, refused = [], []
    for key in sorted(before.keys() | after.keys()):
        if before.get(key) != after.get(key):
            line = f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
            resumable = _listed(key, RESUMABLE)
            (allowed if resumable else refused).append(line)
    return allowed, refused


def _listed(key: str, patterns) -> bool:
    """Whether a dotted setting is among `patterns`: by name, or by its section ("data.*")."""
    return key in patterns or f"{key.split('.')[0]}.*" in patterns


def check_resume(run_dir: Path, cfg: Config) -> list[str]:
    """Refuse to resume `run_dir` with settings other than its own (RESUMABLE aside); returns the
    allowed changes."""
    saved = load_config(run_dir / CONFIG, environ={}, check_machine=False)
    allowed, refused = resume_changes(saved, cfg)
    if refused:
        lines = "\n".join(f"  - {line}" for line in refused)
        raise MathtuneError(
            f"{run_dir}: --resume with settings that differ from the run's ({run_dir / CONFIG} -> now):\n{lines}\n"
            "Resuming would mix two different trainings. Drop these --set/MATHTUNE_* changes, or start a new run "
            f"with them (--output another folder). Settings that may change on resume: {', '.join(RESUMABLE)}.")
    if allowed:
        log.info("Resuming with changed settings: %s", "; ".join(allowed))
    return allowed
