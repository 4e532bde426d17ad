"""What keeps a long `mathtune train` from losing work: whole checkpoints, Ctrl-C, NaN and disk full.

    mathtune train ...                  # Ctrl-C: finishes the step, saves a checkpoint, says how to resume
    mathtune train --resume RUN_DIR     # continues from the newest *complete* checkpoint

- Ctrl-C, SIGTERM (timeout, docker stop, SLURM, Kubernetes) and SIGHUP (a closed terminal; on
  Windows SIGBREAK: Ctrl-Break or a closed console) all stop the same way: the current step ends on
  every process, a checkpoint is saved, and the exit status is 128 + the signal's number (130 for
  Ctrl-C, 143 for SIGTERM, 129 for SIGHUP). A second signal aborts at once.
- Checkpoints are written into RUN_DIR/checkpoints/.partial/checkpoint-N, flushed to disk and only
  then renamed to RUN_DIR/checkpoints/checkpoint-N: a crash or `kill -9` mid-save leaves a folder in
  .partial, never a half checkpoint where `--resume` looks. (transformers' Trainer writes
  checkpoint-N in place, file by file, with trainer_state.json last.)
- A non-finite loss stops training before that step's update is applied or saved.
- A full disk while saving is reported as such; the checkpoints already written stay intact.

`SafeTrainingMixin` goes in front of transformers' `Trainer` in the trainer's bases;
`GracefulInterrupt` is its callback for Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

from mathtune.errors import MathtuneError
from mathtune.files import is_disk_full, publish

log = logging.getLogger("mathtune")

PREFIX = "checkpoint-"
PARTIAL = ".partial"


class TrainingStopped(MathtuneError):
    """Training stopped early for a reason the message explains (interrupt, NaN loss, full disk)."""


class TrainingInterrupted(TrainingStopped):
    """Stopped by a signal after saving a checkpoint; the exit status says which signal."""

    exit_code = 130  # what shells expect after Ctrl-C

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + int(signum)  # the shell convention: 143 after SIGTERM, 129 after SIGHUP


def stop_signals() -> list[signal.Signals]:
    """The signals that ask a run to stop: Ctrl-C; SIGTERM; SIGHUP (not on Windows); SIGBREAK (Windows only)."""
    return [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK") if hasattr(signal, name)]


def last_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint in `checkpoints_dir`: a checkpoint-N folder whose
    trainer_state.json reads as JSON. Folders being written (in .partial) are never candidates."""
    if not checkpoints_dir.is_dir():
        return None
    steps = sorted((int(p.name[len(PREFIX):]), p) for p in checkpoints_dir.glob(f"{PREFIX}*") if p.name[len(PREFIX):].isdigit())
    for _, path in reversed(steps):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return path
    return None


def rotate_checkpoints(root: Path, limit: int | None, best: str | None = None) -> None:
    """Delete the oldest checkpoints beyond `limit`, the ones transformers' rotate_checkpoints chooses
    (the newest and the best are kept), but each renamed into .partial before it is deleted: a
    `kill -9` during a deletion leaves the half-deleted folder there, not a checkpoint-N without its
    adapter where `--resume` and `last_checkpoint` look (transformers deletes it in place)."""
    from transformers.trainer_utils import sort_checkpoints

    if not limit or limit <= 0:
        return
    ordered = sort_checkpoints(str(root), PREFIX.rstrip("-"), best_model_checkpoint=best)  # oldest first
    if len(ordered) <= limit:
        return
    protected = {ordered[-1], str(Path(best))} if best else set(ordered[-1:])
    surplus = len(ordered) - max(limit, len(protected))
    doomed = [Path(folder) for folder in ordered if folder not in protected][: max(surplus, 0)]
    for leftover in (root / PARTIAL).glob("*.deleted"):  # from a run killed while deleting
        shutil.rmtree(leftover, ignore_errors=True)
    for folder in doomed:
        trash = root / PARTIAL / f"{folder.name}.deleted"
        trash.parent.mkdir(exist_ok=True)
        folder.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    if doomed:
        with contextlib.suppress(OSError):
            (root / PARTIAL).rmdir()


def resume_hint(run_dir: Path) -> str:
    return f"mathtune train --resume {run_dir}"


class SafeTrainingMixin:
    """Trainer methods that publish checkpoints atomically and stop on a non-finite loss."""

    def _get_output_dir(self, trial) -> str:
        out = super()._get_output_dir(trial)
        return os.path.join(out, PARTIAL) if getattr(self, "_staging", False) else out

    def _save_checkpoint(self, model, trial) -> None:
        final_root = Path(super()._get_output_dir(trial))
        name = f"{PREFIX}{self.state.global_step}"
        staged = final_root / PARTIAL / name
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # left by a run killed while saving
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        except Exception as exc:
            if self.args.should_save:
                shutil.rmtree(staged, ignore_errors=True)
            if is_disk_full(exc):
                raise TrainingStopped(self._save_failure(final_root, name, "the disk is full")) from None
            raise
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()  # every process has written its part (RNG states)
        if self.args.should_save:
            try:
                publish(staged, final_root / name)
                with contextlib.suppress(OSError):
                    staged.parent.rmdir()  # .partial, when nothing else is being written there
            except OSError as exc:
                shutil.rmtree(staged, ignore_errors=True)
                raise TrainingStopped(self._save_failure(final_root, name, exc.strerror or str(exc))) from None
            rotate_checkpoints(final_root, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _save_failure(self, root: Path, name: str, why: str) -> str:
        previous = last_checkpoint(root)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        return (f"Could not save {name} in {root}: {why}. Training stopped; {kept}. "
                f"Free some space, then continue with: {resume_hint(root.parent)}")

    def _run_epoch(self, *args, **kwargs):
        # Resumed from the final checkpoint (killed while writing the adapter), transformers would
        # still run one step before checking max_steps, and the result would differ from the run's.
        if self.state.global_step >= self.state.max_steps > 0:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        import torch

        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = torch.tensor(0.0 if torch.isfinite(loss).all() else 1.0, device=loss.device)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, "sum")  # every process stops, or none does
        if bad.item():
            self._stop_on_non_finite(loss.item())
        return loss

    def _stop_on_non_finite(self, value: float) -> None:
        root = Path(super()._get_output_dir(None))
        step = self.state.global_step + 1
        previous = last_checkpoint(root)
        kept = (f"The last good checkpoint is {previous}; continue from it with: {resume_hint(root.parent)}"
                if previous else "No checkpoint was saved before it.")
        raise TrainingStopped(
            f"The training loss is {value} at step {step} (of {self.state.max_steps}): training stopped before that "
            f"step's update was applied or saved. {kept} To avoid it: lower train.learning_rate (now "
            f"{self.args.learning_rate:g}), keep train.max_grad_norm set, or look for broken records in the data."
        )


class GracefulInterrupt(TrainerCallback):
    """First stop signal (Ctrl-C, SIGTERM, SIGHUP): finish the current step, save a checkpoint, stop.
    A second one: abort now."""

    def __init__(self):
        self.signum: int | None = None
        """The first stop signal received (by this process, or by any process under torchrun)."""
        self.stopped_at: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @contextmanager
    def installed(self):
        """Catch the stop signals while the block runs (main thread only: Python delivers signals there)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {signum: signal.signal(signum, self._on_signal) for signum in stop_signals()}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.requested:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            print(f"\nmathtune: {signal.Signals(signum).name} again: aborting", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        self.signum = signum
        again = "Ctrl-C again" if signum == signal.SIGINT else f"a second {signal.Signals(signum).name} or Ctrl-C"
        print(f"\nmathtune: {_said(signum)}stopping after this step and saving a checkpoint ({again} aborts at once)",
              file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        signum = _any_process(self.signum or 0, args)
        if signum:
            self.signum = self.signum or signum
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def error(self, checkpoint: Path | None, run_dir: Path) -> TrainingInterrupted:
        """What the run ends with once stopped: where the checkpoint is, how to resume, the exit status."""
        return TrainingInterrupted(f"Interrupted{_said(self.signum, ' by {}')} at step {self.stopped_at}; checkpoint "
                                   f"saved in {checkpoint}. Resume with: {resume_hint(run_dir)}", self.signum)


def _said(signum: int, form: str = "{} received: ") -> str:
    # Ctrl-C speaks for itself; the others are named (a job log shows who stopped the run).
    return "" if signum == signal.SIGINT else form.format(signal.Signals(signum).name)


def _any_process(signum: int, args) -> int:
    # Under torchrun each process gets its own signal, maybe a step apart: agree before stopping,
    # so that every rank stops after the same step (the largest signal number wins the exit status).
    if args.world_size <= 1:
        return signum
    import torch
    import torch.distributed as dist

    value = torch.tensor(float(signum), device=args.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())
