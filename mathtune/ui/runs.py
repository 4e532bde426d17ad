"""The run folders as the UI shows them, and the training processes it starts.

Everything shown comes from what `mathtune train` writes (config.yaml, metrics.jsonl,
train_summary.json, checkpoints/, eval/summary.json) plus the console output of the runs this UI
started, which goes to RUNS/.ui/<name>.log beside the config the run was started with
(RUNS/.ui/<name>.yaml). A run is its own process, started with an argument list (never a shell):

    python -m mathtune train --config RUNS/.ui/NAME.yaml --output RUNS/NAME
    python -m mathtune train --resume RUNS/NAME

so a closed browser, or the UI server stopping, loses nothing; Stop sends what Ctrl-C sends
(SIGINT; CTRL_BREAK_EVENT to the run's process group on Windows): the run finishes its step, saves
a checkpoint and prints the resume hint.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mathtune.errors import MathtuneError
from mathtune.run import CHECKPOINTS, CONFIG, EVAL, METRICS, SUMMARY

UI_DIR = ".ui"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
EXIT_LINE = "[mathtune ui] exit status "
INTERRUPTED = re.compile(r"Interrupted( by \w+)? at step \d+")
"""What a stopped run prints ("Interrupted at step 3", "Interrupted by SIGTERM at step 3") with its resume hint."""


class NoSuchRun(MathtuneError):
    pass


@dataclass
class RunView:
    name: str
    path: Path
    status: str
    """running, finished, interrupted, failed, or incomplete (started elsewhere and not finished)"""
    config: dict
    summary: dict | None
    evaluation: dict | None
    model: str = ""
    steps: int = 0
    max_steps: int | None = None

    @property
    def accuracy(self) -> tuple[float | None, float | None]:
        models = (self.evaluation or {}).get("models", {})
        return (models.get("base", {}).get("accuracy"), models.get("finetuned", {}).get("accuracy"))


def run_name_ok(name: str) -> bool:
    return bool(NAME.match(name)) and name not in (".", "..")


def run_dir(runs: Path, name: str) -> Path:
    """RUNS/NAME of a run folder, or of a run this UI started that has not written its folder yet
    (it loads the model and data first). The name is checked, never used as a path as it comes."""
    if not run_name_ok(name) or not _config_file(runs, name).is_file():
        raise NoSuchRun(f"{name!r}: no such run in {runs}")
    return runs / name


def name_taken(runs: Path, name: str) -> bool:
    return (runs / name).exists() or (runs / UI_DIR / f"{name}.yaml").exists()


def _config_file(runs: Path, name: str) -> Path:
    written = runs / name / CONFIG
    return written if written.is_file() else runs / UI_DIR / f"{name}.yaml"


def list_runs(runs: Path, trainer: RunLauncher) -> list[RunView]:
    if not runs.is_dir():
        return []
    names = {p.name for p in runs.iterdir() if p.is_dir() and (p / CONFIG).is_file()}
    names |= {p.stem for p in (runs / UI_DIR).glob("*.yaml")}
    configs = sorted((_config_file(runs, n) for n in names if run_name_ok(n)), key=lambda p: p.stat().st_mtime, reverse=True)
    return [read_run(runs, p.parent.name if p.name == CONFIG else p.stem, trainer) for p in configs]


def read_run(runs: Path, name: str, trainer: RunLauncher) -> RunView:
    path = run_dir(runs, name)
    config = _read(_config_file(runs, name), yaml.safe_load) or {}
    summary = _read(path / SUMMARY, json.loads)
    evaluation = _read(path / EVAL / "summary.json", json.loads)
    metrics = read_metrics(path)
    steps = summary["steps"] if summary else max((m.get("step", 0) for m in metrics), default=0)
    max_steps = (config.get("train") or {}).get("max_steps")
    model = (summary or {}).get("model", {}).get("path") or (config.get("model") or {}).get("path") or "embedded SmolLM2-135M"
    return RunView(name, path, trainer.status(runs, name, summary is not None), config, summary, evaluation,
                   Path(str(model)).name or str(model), steps, max_steps if max_steps and max_steps > 0 else None)


def read_metrics(path: Path, skip: int = 0) -> list[dict]:
    """metrics.jsonl records from line `skip` on; a line cut short by a running writer is left for later."""
    file = path / METRICS
    if not file.is_file():
        return []
    out = []
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines()[skip:]:
        try:
            record = json.loads(line)
        except ValueError:
            break
        if isinstance(record, dict):
            out.append(record)
    return out


def progress(view: RunView, metrics: list[dict]) -> dict[str, Any]:
    """Step, tokens/s and an estimate of the time left, from the last logged training step."""
    train = [m for m in metrics if "loss" in m]
    last = train[-1] if train else {}
    speed = last.get("tokens_per_second")
    step, tokens = last.get("step", view.steps), last.get("num_input_tokens_seen")
    left = None
    if view.max_steps and speed and tokens and step:
        left = round((view.max_steps - step) * tokens / step / speed)
    return {"step": view.steps, "max_steps": view.max_steps, "tokens_per_second": speed, "seconds_left": left}


def _read(path: Path, parse):
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None


# ---------------------------------------------------------------------------------------------
# Training processes


@dataclass
class RunLauncher:
    """The `mathtune train` processes this server started, by run name."""

    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, runs: Path, name: str, config_text: str) -> None:
        if not run_name_ok(name):
            raise MathtuneError(f"{name!r}: a run name is letters, digits, '.', '_' and '-' (up to 80)")
        target = runs / name
        if name_taken(runs, name):
            raise MathtuneError(f"{target}: exists already; choose another run name")
        saved = runs / UI_DIR / f"{name}.yaml"
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(config_text, encoding="utf-8")
        self._launch(runs, name, ["train", "--config", str(saved), "--output", str(target)])

    def resume(self, runs: Path, name: str) -> None:
        path = run_dir(runs, name)
        if self.alive(name):
            raise MathtuneError(f"{name}: already running")
        if (path / SUMMARY).is_file():
            raise MathtuneError(f"{name}: finished; nothing to resume")
        self._launch(runs, name, ["train", "--resume", str(path)])

    def stop(self, name: str) -> None:
        """What Ctrl-C does: the run finishes its step, saves a checkpoint and says how to resume."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            raise MathtuneError(f"{name}: not running")
        if sys.platform == "win32":
            proc.send_signal(signal.CTRL_BREAK_EVENT)  # the run has its own process group (see _launch)
        else:
            proc.send_signal(signal.SIGINT)

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def status(self, runs: Path, name: str, finished: bool) -> str:
        if self.alive(name):
            return "running"
        if finished:
            return "finished"
        log = log_tail(runs, name, 4000)
        code = next((int(line[len(EXIT_LINE):]) for line in reversed(log.splitlines())
                     if line.startswith(EXIT_LINE) and line[len(EXIT_LINE):].lstrip("-").isdigit()), None)
        if INTERRUPTED.search(log) or code == 130:
            return "interrupted"
        if (code not in (None, 0)) or "mathtune: error" in log:
            return "failed"
        from mathtune.train.checkpoints import last_checkpoint  # imports transformers: only for runs started elsewhere

        return "interrupted" if last_checkpoint(runs / name / CHECKPOINTS) else "incomplete"

    def _launch(self, runs: Path, name: str, args: list[str]) -> None:
        log_path = runs / UI_DIR / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)  # a run started by the CLI, resumed here
        # The run's settings are the saved config alone: MATHTUNE_SECTION__KEY variables of the server's
        # environment would override the form without showing on it (MATHTUNE_CACHE and the like stay).
        env = {k: v for k, v in os.environ.items() if not (k.startswith("MATHTUNE_") and "__" in k)}
        env.update(PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        # Its own session / process group: Ctrl-C in the terminal of `mathtune ui` does not stop the runs,
        # and on Windows CTRL_BREAK_EVENT can be sent to the run alone.
        extra: dict[str, Any] = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if sys.platform == "win32"
                                 else {"start_new_session": True})
        with self.lock:
            if self.alive(name):
                raise MathtuneError(f"{name}: already running")
            log = log_path.open("a", encoding="utf-8")
            try:
                proc = subprocess.Popen([sys.executable, "-m", "mathtune", *args], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env, **extra)
            finally:
                log.close()  # the child holds its own copy
            self.procs[name] = proc
        threading.Thread(target=_note_exit, args=(proc, log_path), daemon=True).start()


def _note_exit(proc: subprocess.Popen, log_path: Path) -> None:
    code = proc.wait()
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"\n{EXIT_LINE}{code}\n")


def log_tail(runs: Path, name: str, chars: int = 3000) -> str:
    """The end of a run's console output (runs started by this UI); progress-bar redraws collapsed."""
    path = runs / UI_DIR / f"{name}.log"
    if not path.is_file():
        return ""
    with path.open("rb") as fh:
        fh.seek(max(0, path.stat().st_size - chars * 4))
        text = fh.read().decode("utf-8", errors="replace")
    # tqdm redraws its bar with \r: keep the last state of each line.
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join(lines)[-chars:]
