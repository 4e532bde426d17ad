"""The file LM Studio runs is the model you measured: a GGUF scored through llama.cpp like the run.

    mathtune eval runs/x --gguf                                # the run's merged f16 export (written if missing)
    mathtune eval runs/x --gguf runs/x/export/m-q8_0.gguf --limit 40
    mathtune eval runs/x --gguf runs/x/export/m-lora.gguf      # an adapter GGUF, on the run's base GGUF
    mathtune eval runs/x --gguf --bench gsm8k --limit 50
    mathtune export runs/x --to gguf --check                   # the same, on the file just written

The problems, max_new_tokens, stop tokens and verifier are those of the run's evaluation
(mathtune.eval.evaluate). The prompt is the GGUF's own chat template (`tokenizer.chat_template`),
rendered and tokenized as llama-cpp-python's chat completion does, and every prompt's tokens are
compared with the run's (`render_chat`). Answers are greedy (top-k 1, temperature 0, no repetition
penalty), one problem at a time from an empty cache. They are compared with the PyTorch fine-tuned
model's answers to the same problems in float32 (RUN_DIR/eval/predictions.jsonl when it holds them
for this adapter in that precision, else scored now and kept in RUN_DIR/eval/gguf/pytorch-float32/
for the next file): the accuracy of each with its 95% interval, the paired change with
McNemar's p, the share of identical answers, the first differing ones side by side, and the
tokens/s of each engine. Written to RUN_DIR/eval/gguf/<file stem>/ (--bench NAME:
RUN_DIR/bench/NAME/gguf/<file stem>/): summary.json and predictions.jsonl; a file measured before,
unchanged, with the same settings, is not measured again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from mathtune.data.template import render_chat
from mathtune.errors import ModelError
from mathtune.eval.accuracy import accuracy_text, comparison_table, paired_change, summarize
from mathtune.eval.evaluate import (
    BENCHES,
    EvalExample,
    bench_examples,
    eval_examples,
    judge,
    protocol,
    run_conversations,
    score,
)
from mathtune.files import unreadable_reason, write_json, write_text
from mathtune.hardware import cpu_bf16_units, cpu_model
from mathtune.model.gguf import read_header
from mathtune.model.load import resolve_source
from mathtune.run import ADAPTER, BENCH, EVAL, load_run_config, load_trained

log = logging.getLogger("mathtune")

LLAMA_CPP_VERSION = "0.3.36"
"""pyproject.toml's `llama` extra (a test keeps them equal)."""
GGUF_RESULTS = "gguf"
"""The folder, inside eval/ (or bench/NAME/), with one folder of results per GGUF file scored."""
SHOWN_DIFFERENCES = 5


def install_hint(purpose: str) -> str:
    return (f"{purpose} needs llama-cpp-python (llama.cpp for Python), which is not installed. Installed with "
            "scripts/setup.sh: bash scripts/llama_cpp.sh (builds it once, about 9 minutes on 2 cores, and keeps the "
            f"wheel in ~/.cache/mathtune/wheels). Otherwise: pip install \"mathtune[llama]\" (or pip install "
            f"llama-cpp-python=={LLAMA_CPP_VERSION}); it compiles llama.cpp, and on Windows needs Visual Studio's C++ "
            "build tools. Or load the file in LM Studio.")


def read_gguf_header(path: Path):
    """The file's GGUF header, or a ModelError that names the file and says what it is instead."""
    reason = unreadable_reason(path)
    if reason:
        raise ModelError(f"{path}: {reason}")
    try:
        return read_header(path)
    except (ValueError, OSError) as exc:
        raise ModelError(f"{path}: not a GGUF file ({exc}); give a .gguf file, such as the one `mathtune export RUN "
                         "--to gguf` writes") from None


def require_llama_cpp(purpose: str) -> None:
    """A ModelError saying how to install llama-cpp-python, where it is missing (before a long export, say)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise ModelError(install_hint(purpose)) from None


def load_llama(path: Path, purpose: str, **options):
    """`llama_cpp.Llama` on the GGUF file `path` (`mathtune chat --gguf`, the evaluation here and the
    export tests), quiet; a ModelError when llama-cpp-python is missing (how to install it) or the file
    is not a GGUF llama.cpp loads. On a CPU with AMX, llama.cpp's AMX weight buffers are left out
    (`without_amx_buffers`)."""
    require_llama_cpp(purpose)
    from llama_cpp import Llama

    read_gguf_header(Path(path))
    try:
        with without_amx_buffers(cpu_bf16_units() == "AMX"):
            return Llama(model_path=str(path), verbose=False, **options)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: llama.cpp could not load it ({exc}); is it complete, and of an architecture this "
                         f"llama-cpp-python knows?") from None


_MODEL_PARAMS_LOCK = threading.Lock()


@contextmanager
def without_amx_buffers(active: bool) -> Iterator[None]:
    """While it is open (and `active`), llama-cpp-python's `Llama()` loads a model with
    `use_extra_bufts = false`, the field llama.cpp's own `--no-repack` sets, which `Llama()` has no
    argument for: weights stay in plain CPU buffers instead of being repacked for AMX.

    Why: llama-cpp-python 0.3.36 built for an Intel Xeon with AMX (GGML_NATIVE, as scripts/llama_cpp.sh
    and a plain `pip install` build it) repacks Q4_1/Q8_0 weights for AMX and then crashes the process
    with a segmentation fault in `ggml_backend_amx_mul_mat` at the first generated token: the embedded SmolLM2
    Q4_1 file and our q8_0 exports, every time, on 1 or 2 threads (Intel Xeon, 2026-12-03; llama.cpp
    issue #20824 reports the same frame). f16 files never used AMX buffers. Other CPUs keep the repack."""
    if not active:
        yield
        return
    import llama_cpp.llama_cpp as native

    defaults = native.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with _MODEL_PARAMS_LOCK:
        native.llama_model_default_params = without_extra_buffers
        try:
            yield
        finally:
            native.llama_model_default_params = defaults


# ---------------------------------------------------------------------------------------------
# Prompts and answers through llama.cpp
#
# Why not `Llama.create_chat_completion`: it renders the same template with the same formatter and
# tokenizes it the same way (`prompt_ids` below repeats its two calls), but it keeps the prompt
# tokens to itself and stops only at the GGUF's EOS token, llama.cpp's end-of-generation set and
# the EOS text. Here the tokens are in hand, so each prompt is checked equal to the run's, and the
# answer stops at exactly the run's stop tokens with its length counted in tokens, as PyTorch's is
# (max_new_tokens, "truncated"). tests/eval/test_gguf.py checks that create_chat_completion gives
# the same answers.


class GgufChat:
    """A GGUF file (or a base GGUF and an adapter GGUF) in llama.cpp, answering chats as the run's
    evaluation does: the file's own chat template, greedy, until one of `stop_tokens`."""

    def __init__(self, path: Path, stop_tokens: list[str], n_ctx: int, lora: Path | None = None):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        options = {"lora_path": str(lora)} if lora else {}
        # llama-cpp-python's own thread count (half the logical CPUs): on a 2-core machine shared with
        # other work, 2 threads measured 1 to 45 tokens/s (its threads spin at each step, waiting for
        # each other) where 1 thread gave a steady 57.
        self.llm = load_llama(path, "mathtune eval --gguf", n_ctx=n_ctx, **options)
        self.threads = self.llm.context_params.n_threads
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelError(f"{path}: has no chat template (tokenizer.chat_template), so LM Studio would wrap "
                             "the problems in a format of its own; export the run again (mathtune export RUN --to gguf) "
                             "to write the run's template into it")
        # What Llama.__init__ builds from the metadata for create_chat_completion (chat_format None).
        self.formatter = Jinja2ChatFormatter(template=template, eos_token=self._text(self.llm.token_eos()),
                                             bos_token=self._text(self.llm.token_bos()))
        self.stop = {}
        for token in stop_tokens:
            ids = self.llm.tokenize(token.encode("utf-8"), add_bos=False, special=True)
            if len(ids) == 1:
                self.stop[ids[0]] = token
            else:
                log.warning("%s: the stop token %s is not one token of this file's vocabulary; not used", path, token)

    def _text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt tokens create_chat_completion would feed the model."""
        rendered = self.formatter(messages=messages)
        return self.llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)

    def answer(self, ids: list[int], max_new_tokens: int) -> tuple[str, bool, int]:
        """(the answer's text, whether it hit max_new_tokens before a stop token, tokens generated)."""
        self.llm.reset()  # from an empty cache: an answer does not depend on the problem before it
        new: list[int] = []
        for token in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            new.append(token)
            if token in self.stop or len(new) >= max_new_tokens:
                break
        stopped = bool(new) and new[-1] in self.stop
        text = self.llm.detokenize(new[:-1] if stopped else new, special=False).decode("utf-8", errors="replace")
        return text.strip(), not stopped and len(new) >= max_new_tokens, len(new)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# The evaluation


def evaluate_gguf(run_dir: Path, path: Path, *, split: str = "eval", limit: int | None = None,
                  max_new_tokens: int | None = None, batch_size: int | None = None,
                  bench: str | None = None, rescore: bool = False) -> dict[str, Any]:
    """`mathtune eval RUN --gguf FILE`: score FILE through llama.cpp on the run's problems, compare it
    with the PyTorch fine-tuned model's answers, write RUN_DIR/eval/gguf/<stem>/ (or bench/NAME/gguf/<stem>/).

    `rescore`: answer with the PyTorch model now (and time it), even where its saved predictions
    hold these problems."""
    require_llama_cpp("mathtune eval --gguf")
    started = time.perf_counter()
    run_dir, path = Path(run_dir), Path(path)
    cfg = load_run_config(run_dir)
    header = read_gguf_header(path)  # a bad file is refused before any model is loaded
    lora = None
    if header.fields.get("general.type") == "adapter":
        lora, path = path, _base_gguf(cfg, path)
    if bench:
        examples = bench_examples(bench, limit, cfg.data.system_prompt)
        max_new_tokens = max_new_tokens or BENCHES[bench].max_new_tokens
        source, out_dir = run_dir / BENCH / bench, run_dir / BENCH / bench / GGUF_RESULTS / (lora or path).stem
    else:
        examples = eval_examples(run_conversations(cfg, split), limit)
        max_new_tokens = max_new_tokens or cfg.eval.max_new_tokens
        source, out_dir = run_dir / EVAL, run_dir / EVAL / GGUF_RESULTS / (lora or path).stem
    checkable = [e for e in examples if e.checkable]
    if not checkable:
        raise ModelError(f"{run_dir}: none of the {len(examples)} problems has a checkable answer to compare")
    settings = {"file": _identity(lora or path), "base_file": _identity(path) if lora else None,
                "adapter": _identity(run_dir / ADAPTER / "adapter_model.safetensors"),
                "problems": bench or split, "limit": limit, "max_new_tokens": max_new_tokens,
                "pytorch_dtype": reference_dtype(cfg)}
    kept = None if rescore else _measured_before(out_dir, settings)
    if kept is not None:
        log.info("%s was measured before, unchanged, with these settings (%s); not measured again.\n\n%s",
                 lora or path, out_dir, gguf_table(kept))
        return kept

    pytorch = _pytorch_answers(run_dir, cfg, checkable, examples, split, source, out_dir, max_new_tokens,
                               batch_size or cfg.eval.batch_size, rescore)
    tokenizer, pytorch_protocol = pytorch.tokenizer, pytorch.protocol
    chat, results, unequal, tokens, seconds = _gguf_answers(path, lora, tokenizer, pytorch_protocol, checkable,
                                                            max_new_tokens)

    summary = {
        "file": str(lora or path), "lora_on": str(path) if lora else None, "settings": settings,
        "examples": len(checkable), "uncheckable_left_out": len(examples) - len(checkable),
        "protocol": {**pytorch_protocol, "prompt": pytorch_protocol["prompt"].replace(
            "the model's chat template", "the GGUF's own chat template (rendered by llama-cpp-python)"),
            "stop_tokens": list(chat.stop.values()),
            "decoding": "greedy (llama.cpp: top-k 1, temperature 0, repeat penalty 1, one problem at a time)"},
        "pytorch_protocol": pytorch_protocol,
        "prompt_tokens": {"equal": len(checkable) - len(unequal), "checked": len(checkable),
                          "first_difference": None if not unequal else {
                              "gguf": tokenizer.decode(unequal[0][1]), "run": tokenizer.decode(unequal[0][2])}},
        "pytorch_answers": pytorch.source, "pytorch_dtype": pytorch.dtype, "run_eval": pytorch.run_eval,
        "models": {"pytorch": summarize(checkable, pytorch.results), "gguf": summarize(checkable, results)},
        "change": paired_change(checkable, pytorch.results, results),
        "agreement": agreement(checkable, pytorch.results, results),
        "differences": differences(checkable, pytorch.results, results),
        "speed": {"llama_cpp": _speed(tokens, seconds, threads=chat.threads, batch=1), "pytorch": pytorch.speed},
        "machine": {"cpu": cpu_model(), "cores": _cpu_count()},
        "llama_cpp_python": _version("llama-cpp-python"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_gguf_eval(out_dir, checkable, pytorch.results, results, summary)
    log.info("\n%s\n\nWritten to %s", gguf_table(summary), out_dir)
    if summary["change"]["significant"]:
        log.warning("WARNING: %s scores significantly differently from the PyTorch model it was exported from", path)
    return summary


class PytorchAnswers(NamedTuple):
    """The PyTorch fine-tuned model's answers a GGUF file is compared with, and where they came from."""
    results: list[dict]
    protocol: dict
    speed: dict | None
    source: str
    """The predictions file they were read from, or "scored now (DTYPE)"."""
    dtype: str
    run_eval: dict | None
    """The run's own scores, where they were given in another precision than `dtype`."""
    tokenizer: Any


def _pytorch_answers(run_dir: Path, cfg, checkable: list[EvalExample], examples: list[EvalExample], split: str,
                     source: Path, out_dir: Path, max_new_tokens: int, batch_size: int,
                     rescore: bool) -> PytorchAnswers:
    """The run's saved answers to these problems where they were given in the reference precision,
    else the reference's saved ones (out_dir's pytorch-DTYPE), else scored now and saved there."""
    from transformers import AutoTokenizer

    # The reference is the fine-tuned model in float32: the file holds its weights rounded to f16 or
    # q8_0 and llama.cpp computes in f32. Answers of a run evaluated in bfloat16 are no reference for
    # "identical": on the default run (bf16 on a CPU with bf16 units) bf16 and f32 PyTorch gave
    # different greedy answers to 11 of 40 problems, and f32 PyTorch and the f16 file to 1 of 40.
    dtype = reference_dtype(cfg)
    reference = out_dir.parent / f"pytorch-{dtype}"
    saved, run_eval = None, None
    if not rescore and split == "eval":
        saved = saved_answers(source, examples, max_new_tokens, run_dir / ADAPTER)
        if saved is not None and cfg.model.dtype != dtype:
            run_eval = {"dtype": cfg.model.dtype, **summarize(checkable, saved[0])}
            saved = None
    if saved is None and not rescore:
        saved = saved_answers(reference, checkable, max_new_tokens, run_dir / ADAPTER)
        source = reference
    if saved is not None:
        tokenizer = AutoTokenizer.from_pretrained(run_dir / ADAPTER)
        log.info("PyTorch's answers (%s): %s (the same %d problems)", dtype, source / "predictions.jsonl",
                 len(checkable))
        return PytorchAnswers(saved[0], saved[1], _saved_speed(source), str(source / "predictions.jsonl"), dtype,
                              run_eval, tokenizer)
    model, tokenizer = load_trained(run_dir, cfg.model_copy(update={"model": cfg.model.model_copy(
        update={"dtype": dtype})}))
    model.eval()
    log.info("Scoring %d problems with the PyTorch fine-tuned model in %s (%s)", len(checkable), dtype,
             "--rescore" if rescore else f"the run's answers were given in {cfg.model.dtype}" if run_eval else
             "no saved answers to these problems")
    t0 = time.perf_counter()
    results = score(model, tokenizer, checkable, max_new_tokens, batch_size, cfg.data.max_seq_length)
    seconds = time.perf_counter() - t0
    # The answers re-tokenized, plus the stop token of each that stopped: generate() keeps no count.
    tokens = sum(min(max_new_tokens, len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) + 1)
                 for r in results)
    speed = _speed(tokens, seconds, threads=_torch_threads(), batch=batch_size)
    answered = protocol(tokenizer, model, checkable, max_new_tokens)
    del model
    write_reference(reference, checkable, results, {"dtype": dtype, "protocol": answered, "speed": speed})
    return PytorchAnswers(results, answered, speed, f"scored now ({dtype})", dtype, run_eval, tokenizer)


def _gguf_answers(path: Path, lora: Path | None, tokenizer, pytorch_protocol: dict, checkable: list[EvalExample],
                  max_new_tokens: int):
    """llama.cpp's greedy answers to the problems, one at a time, from the GGUF's own chat template:
    (the chat, the judged results, the problems whose prompt tokens differ from the run's, answer
    tokens, seconds answering)."""
    from tqdm.auto import tqdm

    run_ids = [tokenizer(render_chat(tokenizer, e.prompt, add_generation_prompt=True),
                         add_special_tokens=False)["input_ids"] for e in checkable]
    chat = GgufChat(path, pytorch_protocol["stop_tokens"], n_ctx=max(map(len, run_ids)) + max_new_tokens + 8,
                    lora=lora)
    log.info("Answering %d problems with %s through llama.cpp (%s)", len(checkable), lora or path,
             _threads(chat.threads))
    results, unequal, tokens, seconds = [], [], 0, 0.0
    for example, want in tqdm(list(zip(checkable, run_ids)), desc="Answering (llama.cpp)", leave=False,
                              dynamic_ncols=True):
        ids = chat.prompt_ids(example.prompt)
        if ids != want:
            unequal.append((example, ids, want))
        t0 = time.perf_counter()
        text, hit_limit, n = chat.answer(ids, max_new_tokens)
        seconds += time.perf_counter() - t0
        tokens += n
        results.append(judge(text, hit_limit, example.reference))
    if unequal:
        example, got, want = unequal[0]
        log.warning("WARNING: the GGUF's chat template gives other prompt tokens than the run's on %d of %d problems, "
                    "e.g. %r where the run has %r", len(unequal), len(checkable),
                    tokenizer.decode(got), tokenizer.decode(want))
    return chat, results, unequal, tokens, seconds


def _base_gguf(cfg, adapter: Path) -> Path:
    """The GGUF an adapter GGUF is applied to: the run's base model, when it is a GGUF file."""
    source = resolve_source(cfg.model)
    if source.kind != "gguf":
        raise ModelError(f"{adapter}: an adapter GGUF is scored on the run's base model as a GGUF file, and this run "
                         f"trained on {source.path}; score the merged file instead (mathtune eval RUN --gguf)")
    return Path(source.path)


def reference_dtype(cfg) -> str:
    """The precision PyTorch's reference answers are given in: float32, except for a 4-bit (QLoRA)
    base, which has no float32 weights to load."""
    return cfg.model.dtype if cfg.model.load_in_4bit else "float32"


def write_reference(folder: Path, examples: list[EvalExample], results: list[dict], summary: dict) -> None:
    """PyTorch's answers in the shape of RUN_DIR/eval/ (predictions.jsonl with "finetuned", summary.json
    with "protocol"), for the next file scored on the same problems (q8_0 after f16, say)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": e.prompt, "reference": e.reference, "topic": e.topic, "checkable": True,
                         "finetuned": r}, ensure_ascii=False) + "\n" for e, r in zip(examples, results)]
    write_text(folder / "predictions.jsonl", "".join(lines))
    write_json(folder / "summary.json", summary)


def _saved_speed(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "summary.json").read_text(encoding="utf-8")).get("speed")
    except (OSError, ValueError, AttributeError):
        return None


def _identity(path: Path) -> dict | None:
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return {"path": str(Path(path).resolve()), "bytes": stat.st_size, "modified_ns": stat.st_mtime_ns}


def _measured_before(out_dir: Path, settings: dict) -> dict | None:
    try:
        kept = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(kept, dict) and kept.get("settings") == settings and (out_dir / "predictions.jsonl").is_file()
    return kept if ok else None


def saved_answers(source: Path, examples: list[EvalExample], max_new_tokens: int,
                  adapter: Path) -> tuple[list[dict], dict] | None:
    """The fine-tuned model's results on the checkable `examples` and the protocol they were
    obtained with, from `source`/predictions.jsonl and summary.json: None unless that file holds
    these problems, in this order, answered with this max_new_tokens by the current adapter."""
    predictions, summary = source / "predictions.jsonl", source / "summary.json"
    try:
        saved = json.loads(summary.read_text(encoding="utf-8"))
        lines = predictions.read_text(encoding="utf-8").splitlines()
        if predictions.stat().st_mtime < max(p.stat().st_mtime for p in adapter.iterdir()):
            return None  # trained on (--resume) since
    except (OSError, ValueError):
        return None
    if saved.get("protocol", {}).get("max_new_tokens") != max_new_tokens or len(lines) < len(examples):
        return None
    results = []
    for example, line in zip(examples, lines):
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if record.get("prompt") != example.prompt or record.get("reference") != example.reference:
            return None
        if example.checkable:
            if not isinstance(record.get("finetuned"), dict) or "response" not in record["finetuned"]:
                return None
            results.append(record["finetuned"])
    return results, saved["protocol"]


def agreement(examples: list[EvalExample], pytorch: list[dict], gguf: list[dict]) -> dict[str, Any]:
    """How often the two engines gave the very same answer, and the same verdict."""
    identical = sum(p["response"] == g["response"] for p, g in zip(pytorch, gguf))
    verdict = sum(bool(p["correct"]) == bool(g["correct"]) for p, g in zip(pytorch, gguf))
    n = len(examples)
    return {"identical": identical, "same_verdict": verdict, "checked": n,
            "identical_share": round(identical / n, 4) if n else 0.0}


def differences(examples: list[EvalExample], pytorch: list[dict], gguf: list[dict],
                shown: int = SHOWN_DIFFERENCES) -> list[dict]:
    """The first `shown` problems the two engines answered differently, side by side."""
    out = []
    for i, (example, p, g) in enumerate(zip(examples, pytorch, gguf)):
        if p["response"] != g["response"] and len(out) < shown:
            out.append({"index": i, "problem": example.prompt[-1]["content"], "expected": g["expected"],
                        "pytorch": p["response"], "pytorch_correct": p["correct"],
                        "gguf": g["response"], "gguf_correct": g["correct"]})
    return out


def _speed(tokens: int, seconds: float, threads: int, batch: int) -> dict[str, Any]:
    return {"tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None, "threads": threads,
            "problems_at_once": batch}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def write_gguf_eval(out_dir: Path, examples: list[EvalExample], pytorch: list[dict], gguf: list[dict],
                    summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": e.prompt, "reference": e.reference, "topic": e.topic, "pytorch": p, "gguf": g,
                         "identical": p["response"] == g["response"]}, ensure_ascii=False) + "\n"
             for e, p, g in zip(examples, pytorch, gguf)]
    write_text(out_dir / "predictions.jsonl", "".join(lines))
    write_json(out_dir / "summary.json", summary)  # last: a summary means its predictions are complete


def gguf_table(summary: dict, width: int = 100) -> str:
    """The accuracy table (PyTorch vs the GGUF, paired), the agreement, speed and the first differences."""
    table = comparison_table({"models": {"base": summary["models"]["pytorch"], "finetuned": summary["models"]["gguf"]},
                              "change": summary["change"], "base_label": "PyTorch",
                              "finetuned_label": "GGUF (llama.cpp)", "protocol": summary["protocol"]})
    a, tokens, speed = summary["agreement"], summary["prompt_tokens"], summary["speed"]
    lines = [f"File: {summary['file']}" + (f" (on {summary['lora_on']})" if summary.get("lora_on") else ""), table,
             f"Identical answers: {a['identical']} of {a['checked']} ({100 * a['identical_share']:.1f}%); same verdict: "
             f"{a['same_verdict']} of {a['checked']}. PyTorch's answers: {summary['pytorch_answers']}.",
             f"Prompt tokens equal to the run's (render_chat): {tokens['equal']} of {tokens['checked']} problems."]
    if summary.get("run_eval"):
        run_eval = summary["run_eval"]
        lines.append(f"PyTorch above is the model in {summary['pytorch_dtype']}; the run's own evaluation, in "
                     f"{run_eval['dtype']}: {accuracy_text(run_eval)} (its rounding alone changes greedy answers).")
    ours = speed["llama_cpp"]
    text = (f"Speed: llama.cpp {ours['tokens_per_second']} tokens/s ({ours['tokens']} tokens, one problem at a time, "
            f"{_threads(ours['threads'])})")
    theirs = speed.get("pytorch")
    text += (f"; PyTorch {theirs['tokens_per_second']} tokens/s ({theirs['tokens']} tokens, batches of "
             f"{theirs['problems_at_once']}, {_threads(theirs['threads'])})" if theirs else
             "; PyTorch not timed (its answers were read from its predictions; --rescore times it)")
    lines.append(f"{text}; {summary['machine']['cpu']}.")
    if summary["differences"]:
        lines.append("First differing answers:")
    for d in summary["differences"]:
        lines.append(f"- problem {d['index']}: {_short(d['problem'], width)}\n"
                     f"    PyTorch ({'right' if d['pytorch_correct'] else 'wrong'}): {_short(d['pytorch'], width)}\n"
                     f"    GGUF    ({'right' if d['gguf_correct'] else 'wrong'}): {_short(d['gguf'], width)}")
    return "\n".join(lines)


def _threads(n: int) -> str:
    return f"{n} thread{'s' * (n != 1)}"


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
