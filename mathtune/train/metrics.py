"""What a run logs while it trains and says when it ends: metrics.jsonl, the progress bar, tokens/s.

    RunLogger(run_dir / METRICS)          # a Trainer callback: one JSON line per logging step
    summary_text(summary, run_dir)        # the closing lines of `mathtune train`

metrics.jsonl is what the report, the UI's live loss chart and a resumed run read back: a resumed run
drops the lines past its checkpoint (those steps run again), and a line cut short by a killed
process is skipped when read.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from mathtune.errors import MathtuneError
from mathtune.files import write_text
from mathtune.run import ADAPTER, METRICS


class RunLogger(TrainerCallback):
    """metrics.jsonl (one line per logging step) and a progress bar with loss, lr and tokens/s."""

    def __init__(self, path: Path, show_progress: bool = True, write: bool = True):
        self.path, self.show_progress, self.write = path, show_progress, write
        self.bar = None
        self._last = (0.0, 0)  # (time, tokens) at the previous log, for tokens/s
        self.tokens_at_start = 0  # a resumed run's tokens of earlier sessions

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if self.write and self.path.exists():
            # After a resume, drop lines past the checkpoint: those steps run again.
            keep = [line for line, record in metric_lines(self.path) if record.get("step", 0) <= state.global_step]
            write_text(self.path, "".join(f"{line}\n" for line in keep))
        if self.show_progress:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="Training", dynamic_ncols=True)
        self._last = (time.perf_counter(), state.num_input_tokens_seen)
        self.tokens_at_start = state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
        if state.global_step >= state.max_steps:
            control.should_log = True  # the last step's loss, also when the run is shorter than logging_steps
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = {} if logs is None else logs
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        last_time, last_tokens = self._last
        if "loss" in logs and now > last_time:
            # Into the Trainer's own dict: the tracker callbacks (train.report_to) run after this one.
            logs["tokens_per_second"] = round((tokens - last_tokens) / (now - last_time), 1)
            self._last = (now, tokens)
        record = {"step": state.global_step, **{k: _plain(v) for k, v in logs.items()}}
        if self.write:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.bar is not None:
            if "loss" in logs:
                reward = {"reward": f"{logs['reward']:.3f}"} if logs.get("reward") is not None else {}  # GRPO
                self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.2e}", **reward,
                                     tok_s=f"{logs['tokens_per_second']:.0f}", refresh=False)
            elif "eval_loss" in logs:
                self.bar.write(f"step {state.global_step}: eval loss {logs['eval_loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def first_eval_loss(trainer, start_step: int) -> float | None:
    """The eval loss train() took before its first step (eval_on_start): the last one logged at
    `start_step` (a resumed run's history also holds the evaluations of earlier sessions)."""
    at_start = [e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e and e.get("step") == start_step]
    loss = at_start[-1] if at_start else None
    if loss is not None and not math.isfinite(loss):
        raise MathtuneError(f"evaluation loss before training is {loss}: the model or data produce non-finite values")
    return None if loss is None else round(loss, 6)


def logged_eval_before(run_dir: Path) -> float | None:
    """The eval loss logged at step 0 of this run (RunLogger writes it), for a resumed run's summary."""
    records = [record for _, record in metric_lines(run_dir / METRICS)]
    return next((r["eval_loss"] for r in records if r.get("step") == 0 and "eval_loss" in r), None)


def metric_lines(path: Path) -> list[tuple[str, dict]]:
    """(line, record) of metrics.jsonl; a line cut short by a killed process is left out."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append((line, record))
    return out


def summary_text(summary: dict, run_dir: Path) -> str:
    before, after = summary["eval_loss_before"], summary["eval_loss_after"]
    change = f"  ({after - before:+.4f})" if before is not None and after is not None else ""
    return "\n".join(
        [
            "",
            f"Done: {summary['steps']} steps in {summary['train_seconds']:.0f} s, "
            f"{summary['tokens_per_second'] or 0:.0f} tokens/s ({summary['tokens_seen']:,} tokens"
            + (f", {summary['precision']})" if summary.get("precision") else ")"),
            f"  train loss  {_loss(summary['first_train_loss'])} -> {_loss(summary['last_train_loss'])}",
            f"  eval loss   {_loss(before)} -> {_loss(after)}{change}",
            f"  adapter     {run_dir / ADAPTER}",
            f"  next        mathtune export {run_dir} --to gguf   (for LM Studio / llama.cpp)",
        ]
    )


def _loss(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.4f}"


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value
