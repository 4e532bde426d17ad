"""The work the UI does inside its own process: evaluation and export jobs, and chat.

Each calls the function the CLI calls (`mathtune eval --base` + `mathtune report`, `mathtune export
[--check]`, `mathtune chat`), in a thread so that the pages stay responsive; the mathtune log lines of a job's
thread are its progress. Training never runs here: it is a process of its own (runs.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from mathtune.chat import stream_reply
from mathtune.errors import MathtuneError
from mathtune.eval.accuracy import accuracy_text, p_text
from mathtune.eval.evaluate import comparison_table, evaluate_run
from mathtune.eval.gguf import GGUF_RESULTS, gguf_table, require_llama_cpp
from mathtune.eval.report import write_report
from mathtune.export import check_export, export_run, how_to_use
from mathtune.run import EVAL, load_run_config, load_trained

log = logging.getLogger("mathtune")

EXPORTS = {"gguf-f16": ("gguf", "f16"), "gguf-q8_0": ("gguf", "q8_0"), "lmstudio-f16": ("lmstudio", "f16"),
           "ollama-f16": ("ollama", "f16"), "gguf-lora": ("gguf-lora", "f16"), "hf": ("hf", "f16")}
"""The export choices of the Export page: --to and --quant of `mathtune export` (lmstudio: where LM Studio's
models folder exists)."""


@dataclass
class UiJob:
    kind: str
    """'eval' or 'export'"""
    started: float = field(default_factory=time.time)
    finished: float | None = None
    lines: list[str] = field(default_factory=list)
    error: str | None = None

    def as_dict(self) -> dict:
        state = "running" if self.finished is None else "failed" if self.error else "done"
        end = self.finished or time.time()
        return {"kind": self.kind, "state": state, "seconds": round(end - self.started), "lines": self.lines[-40:],
                "error": self.error}


class _ThreadLog(logging.Handler):
    """mathtune's log records emitted by one thread, appended to that thread's job."""

    def __init__(self, job: UiJob, thread_id: int):
        super().__init__(logging.INFO)
        self.job, self.thread_id = job, thread_id

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread_id:
            self.job.lines.extend(record.getMessage().splitlines())


class Jobs:
    """One job at a time per run; the last one of each run is kept to be shown."""

    def __init__(self) -> None:
        self.by_run: dict[str, UiJob] = {}
        self.lock = threading.Lock()

    def start(self, run: str, kind: str, work: Callable[[], list[str]]) -> UiJob:
        with self.lock:
            current = self.by_run.get(run)
            if current is not None and current.finished is None:
                raise MathtuneError(f"{run}: a {current.kind} job is running; wait for it to finish")
            job = self.by_run[run] = UiJob(kind)
        threading.Thread(target=self._run, args=(job, work), daemon=True).start()
        return job

    def get(self, run: str) -> UiJob | None:
        return self.by_run.get(run)

    @staticmethod
    def _run(job: UiJob, work: Callable[[], list[str]]) -> None:
        handler = _ThreadLog(job, threading.get_ident())
        log.addHandler(handler)
        try:
            job.lines.extend(work())
        except MathtuneError as exc:
            job.error = str(exc)
        except Exception as exc:  # a bug in mathtune: shown on the page, with its type, and in the server log
            log.exception("%s job failed", job.kind)
            job.error = f"{type(exc).__name__}: {exc}"
        finally:
            log.removeHandler(handler)
            job.finished = time.time()


def evaluate_and_report(run_dir: Path) -> list[str]:
    """`mathtune eval RUN --base` then `mathtune report RUN`."""

    summary = evaluate_run(run_dir, base=True)
    return [*comparison_table(summary).splitlines(), f"Written {write_report(run_dir)}"]


def export(run_dir: Path, choice: str, check: bool = False) -> list[str]:
    """`mathtune export RUN --to ... --quant ... [--check]` into RUN/export/."""

    if choice not in EXPORTS:
        raise MathtuneError(f"{choice!r}: expected one of {', '.join(EXPORTS)}")
    to, quant = EXPORTS[choice]
    if check:
        if to == "hf":
            raise MathtuneError("the llama.cpp check scores a GGUF file; the safetensors folder has none")
        require_llama_cpp("Checking an export with llama.cpp")
    result = export_run(run_dir, to, quant=quant)
    lines = how_to_use(result)
    if check:
        lines += gguf_table(check_export(run_dir, result)).splitlines()
    return lines


def llama_cpp_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def gguf_checks(run_dir: Path) -> list[dict]:
    """One row per GGUF file scored through llama.cpp (RUN_DIR/eval/gguf/*/summary.json): its accuracy
    and PyTorch's on the same problems, the paired p-value and the share of identical answers."""
    rows = []
    for file in sorted((run_dir / EVAL / GGUF_RESULTS).glob("*/summary.json")):
        try:
            summary = json.loads(file.read_text(encoding="utf-8"))
            models, agreement, change = summary["models"], summary["agreement"], summary["change"]
            rows.append({"file": Path(summary["file"]).name, "gguf": accuracy_text(models["gguf"]),
                         "pytorch": accuracy_text(models["pytorch"]), "p": p_text(change["p_value"]),
                         "identical": f"{agreement['identical']}/{agreement['checked']} "
                                      f"({100 * agreement['identical_share']:.1f}%)"})
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a summary being written, or of another version: not shown
    return rows


def exported_files(run_dir: Path) -> list[Path]:
    folder = run_dir / "export"
    return sorted(p for p in folder.iterdir() if not p.name.endswith((".partial", ".tmp"))) if folder.is_dir() else []


# ---------------------------------------------------------------------------------------------
# Chat: the base and the fine-tuned model on the same question


class ChatModels:
    """The last run chatted with, loaded once (base + adapter); generation one at a time."""

    def __init__(self) -> None:
        self.loaded: tuple[Path, object, object, str | None] | None = None
        self.lock = threading.Lock()

    def stream(self, run_dir: Path, question: str, max_new_tokens: int = 256) -> Iterator[tuple[str, str]]:
        """(side, text) pieces: the fine-tuned answer, then the base model's ('tuned', 'base')."""

        with self.lock:
            model, tokenizer, system = self._load(run_dir)
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
            for piece in stream_reply(model, tokenizer, messages, max_new_tokens):
                yield "tuned", piece
            with model.disable_adapter():  # the same weights without LoRA: the base model
                for piece in stream_reply(model, tokenizer, messages, max_new_tokens):
                    yield "base", piece

    def _load(self, run_dir: Path):
        if self.loaded is None or self.loaded[0] != run_dir:
            self.loaded = None  # free the previous run's model first
            cfg = load_run_config(run_dir)
            model, tokenizer = load_trained(run_dir, cfg)
            model.eval()
            self.loaded = (run_dir, model, tokenizer, cfg.data.system_prompt)
        return self.loaded[1:]
