"""Experiment trackers (train.report_to): TensorBoard, MLflow, wandb and Trackio through transformers'
own callbacks, writing into the run folder, with the verified accuracies after training in the same runs.

    mathtune train --set "train.report_to=[tensorboard,mlflow]"
    tensorboard --logdir runs/NAME/tensorboard
    mlflow ui --backend-store-uri sqlite:///runs/NAME/mlflow.db

A tracker's own settings win where they are given (TENSORBOARD_LOGGING_DIR, MLFLOW_TRACKING_URI,
MLFLOW_EXPERIMENT_NAME, WANDB_DIR, WANDB_PROJECT, WANDB_MODE, TRACKIO_DIR...); where they are not,
TensorBoard writes RUN_DIR/tensorboard, MLflow RUN_DIR/mlflow.db (an SQLite store: MLflow 3 refuses
its old ./mlruns file store), wandb RUN_DIR/wandb into project "mathtune", Trackio its own database
(project "mathtune"). Every run is named after its folder.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers.integrations import TensorBoardCallback, WandbCallback, get_reporting_integration_callbacks

log = logging.getLogger("mathtune")

TENSORBOARD = "tensorboard"
MLFLOW_DB = "mlflow.db"


@contextmanager
def reporting(trainer, run_dir: Path) -> Iterator[None]:
    """The trainer's trackers, open from training until the block ends: after trainer.train() come
    the held-out loss and the accuracies (log_final), which belong to the same runs."""
    trackers = _trackers(trainer)
    if not trackers:
        yield
        return
    for cb in trackers:
        # Last, so that they log what the other callbacks add to the logs (RunLogger's tokens/s).
        trainer.callback_handler.remove_callback(cb)
        trainer.callback_handler.add_callback(cb)
        # trainer.train() ends with on_train_end, which ends MLflow's and Trackio's runs and closes the
        # TensorBoard writer: held until the block ends (an instance attribute, deleted then).
        cb.on_train_end = _held
        if isinstance(cb, TensorBoardCallback) and cb.logging_dir is None:  # TENSORBOARD_LOGGING_DIR unset
            cb.logging_dir = str(run_dir / TENSORBOARD)
    report_to = trainer.args.report_to
    defaults = {}
    if "mlflow" in report_to:
        defaults["MLFLOW_TRACKING_URI"] = f"sqlite:///{(run_dir / MLFLOW_DB).resolve().as_posix()}"
    if "wandb" in report_to:
        defaults |= {"WANDB_DIR": str(run_dir.resolve()), "WANDB_PROJECT": "mathtune"}
    added = {name: value for name, value in defaults.items() if not os.environ.get(name)}
    os.environ.update(added)  # read when the trackers start their runs (on_train_begin) and on every log
    if trainer.is_world_process_zero():
        log.info("Reporting to %s%s", ", ".join(report_to), _where(trackers, added))
    ok = False
    try:
        yield
        ok = True
    finally:
        try:
            _close(trainer, trackers, ok)
        finally:
            for name in added:
                os.environ.pop(name, None)


def log_final(trainer, metrics: dict[str, float]) -> None:
    """`metrics` (the verified accuracies after training) at the run's last step, to the trackers
    alone: metrics.jsonl and the Trainer's history are the training's, and RUN_DIR/eval has the scores."""
    for cb in _trackers(trainer) if metrics else []:
        cb.on_log(trainer.args, trainer.state, trainer.control, logs=dict(metrics), model=trainer.model)


def accuracies(held_out: dict, benches: dict[str, dict]) -> dict[str, float]:
    """Tracker metrics from the evaluation summaries (mathtune.eval.evaluate): eval_accuracy and
    eval_base_accuracy on the held-out split (the base is the starting adapter in an --init-from run),
    eval_<bench>_accuracy and eval_<bench>_base_accuracy for each benchmark. The trackers show them as
    eval/accuracy, eval/base_accuracy... beside eval/loss."""
    out = {}
    for prefix, summary in [("eval_", held_out), *((f"eval_{name}_", s) for name, s in benches.items())]:
        for model, label in (("finetuned", ""), ("base", "base_")):
            scores = summary["models"].get(model)
            if scores and scores["checked"]:  # no checkable answers: no accuracy (not 0)
                out[f"{prefix}{label}accuracy"] = scores["accuracy"]
    return out


def _trackers(trainer) -> list:
    kinds = tuple(get_reporting_integration_callbacks(trainer.args.report_to))
    return [cb for cb in trainer.callback_handler.callbacks if kinds and isinstance(cb, kinds)]


def _held(*args, **kwargs) -> None:
    return None


def _close(trainer, trackers: list, ok: bool) -> None:
    for cb in trackers:
        if cb.__dict__.pop("on_train_end", None) is None:
            continue  # closed already
        cb.on_train_end(trainer.args, trainer.state, trainer.control, model=trainer.model,
                        processing_class=trainer.processing_class)
        if isinstance(cb, WandbCallback) and cb._wandb is not None and cb._wandb.run is not None:
            # wandb's callback leaves its run open (for the process's exit): the next training in this
            # process would log into it.
            cb._wandb.finish(exit_code=0 if ok else 1)


def _where(trackers: list, added: dict[str, str]) -> str:
    """How to look at what goes into the run folder."""
    lines = [f"tensorboard --logdir {cb.logging_dir}" for cb in trackers if isinstance(cb, TensorBoardCallback)]
    if "MLFLOW_TRACKING_URI" in added:
        lines.append(f"mlflow ui --backend-store-uri {added['MLFLOW_TRACKING_URI']}")
    if "WANDB_DIR" in added:
        lines.append(f"wandb files in {Path(added['WANDB_DIR']) / 'wandb'}")
    return "".join(f"\n  {line}" for line in lines)
