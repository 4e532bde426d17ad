"""Verified math accuracy, base vs fine-tuned, overall and per topic.

    mathtune eval runs/x                       # the run's held-out split, fine-tuned model
    mathtune eval runs/x --base --limit 200    # and the base model on the same examples
    mathtune eval runs/x --data my_test.jsonl --base
    mathtune eval runs/x --bench gsm8k --limit 100 # base vs fine-tuned on the shipped GSM8K sample

Each example's prompt is its conversation up to the last assistant turn, rendered with the run's
chat template; the model answers greedily (batched, left padding) until its end-of-turn token, and
the answer is checked against the reference's final answer with `verify.validate_math_response`
(math-verify). Accuracy is given per topic: the record's "topic" field, or else the topic that
`data.topics` detects from its text. Records whose reference has no checkable answer (concept
explanations) are left out of accuracy; for them the per-token loss of the reference text is
reported instead.

Every accuracy comes with its 95% interval, and base vs fine-tuned with the paired change and
McNemar's test (mathtune.eval.accuracy); the protocol (prompt, decoding, verifier) is printed and saved
beside the scores. Writes RUN_DIR/eval/predictions.jsonl (one line per example, both models side
by side) and RUN_DIR/eval/summary.json; --bench writes RUN_DIR/bench/NAME/ instead.

Plain-text data (data.format: text) has no questions to answer: its held-out documents are packed
as in training and scored by loss and perplexity (RUN_DIR/eval/perplexity.json).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from mathtune.config import DataConfig
from mathtune.data.dataset import DataReport, load_conversations, split_conversations
from mathtune.data.template import render_chat
from mathtune.data.tokenize import IGNORE_INDEX, is_text, pack_documents, tokenize_conversation
from mathtune.data.topics import record_topic
from mathtune.eval.accuracy import comparison_table, paired_change, significant_drop, summarize
from mathtune.files import write_json, write_text
from mathtune.hardware import probe_memory
from mathtune.run import BENCH, EVAL, load_run_config, load_trained
from mathtune.verify import reference_answer, stated_answer, validate_math_response

log = logging.getLogger("mathtune")

# End-of-turn tokens of common chat templates; generation stops at whichever the vocabulary has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass
class EvalExample:
    prompt: list[dict[str, str]]
    """The conversation up to (not including) its last assistant turn."""
    reference: str
    """The last assistant turn: the answer the model should give."""
    topic: str
    checkable: bool


def eval_examples(conversations, limit: int | None = None) -> list[EvalExample]:
    """One example per conversation: its last assistant turn is the reference."""
    examples = []
    for row in conversations:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        reference = messages[last]["content"]
        examples.append(
            EvalExample(
                prompt=messages[:last],
                reference=reference,
                topic=record_topic(row.get("topic"), messages),  # detected when the record has none
                checkable=reference_answer(reference) is not None,
            )
        )
        if limit and len(examples) >= limit:
            break
    return examples


class Generated(NamedTuple):
    text: str
    hit_limit: bool
    """Generation stopped at max_new_tokens, not at an end-of-turn token."""


# Answers are generated this many tokens at a time; between the pieces the rows that have stopped
# leave the batch (with their part of the KV cache). generate() alone runs every row of a batch to
# its longest answer, and a decoding step costs about as much per row as it computes: on the
# default run (2-core Intel Xeon, batch 40) this took the fine-tuned model's answers from 19.0 to
# 15.3 s and the base's from 21.3 to 18.6 s (pieces of 8 and 32 were no better).
ANSWER_PIECE = 16


def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[Generated]:
    """Greedy answers, batched with left padding, stopping at the end-of-turn token."""
    from tqdm.auto import tqdm

    texts = [render_chat(tokenizer, p, add_generation_prompt=True) for p in prompts]
    stop = stop_token_ids(tokenizer, model)
    # Similar lengths in one batch waste less on padding; answers are put back in input order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers: list[Generated] = [Generated("", False)] * len(texts)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="Generating", leave=False, dynamic_ncols=True):
            batch = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
            for i, ids in zip(batch, greedy_answers(model, enc.to(model.device), stop, tokenizer.pad_token_id,
                                                    max_new_tokens)):
                answers[i] = Generated(tokenizer.decode(ids, skip_special_tokens=True).strip(),
                                       len(ids) >= max_new_tokens and not set(ids) & set(stop))
    finally:
        tokenizer.padding_side = padding_side
    return answers


def greedy_answers(model, enc, stop: list[int], pad_token_id: int, max_new_tokens: int) -> list[list[int]]:
    """Each row's greedy answer tokens, up to and including its stop token, from model.generate
    run ANSWER_PIECE tokens at a time on the rows still answering (the KV cache carried over and cut
    down to them: `Cache.batch_select_indices`; it appends in place, `kvcache.appending_cache`). Each
    row's tokens are the ones one generate() call over the whole batch gives (a test holds them equal)."""
    import torch

    from mathtune.eval.kvcache import appending_cache  # torch and transformers: seconds to import

    input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    rows = list(range(input_ids.shape[0]))
    answers: list[list[int]] = [[] for _ in rows]
    cache = appending_cache(model, room=ANSWER_PIECE)
    while rows:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                                 max_new_tokens=min(ANSWER_PIECE, max_new_tokens - len(answers[rows[0]])),
                                 do_sample=False, eos_token_id=stop, pad_token_id=pad_token_id, use_cache=True,
                                 return_dict_in_generate=True)
        new = out.sequences[:, input_ids.shape[1] :]
        going = []
        for k, (row, ids) in enumerate(zip(rows, new.tolist())):
            stopped = next((j for j, token in enumerate(ids) if token in stop), None)
            answers[row] += ids if stopped is None else ids[: stopped + 1]
            if stopped is None and len(answers[row]) < max_new_tokens:
                going.append(k)
        if not going:
            break
        keep = torch.tensor(going, device=input_ids.device)
        rows = [rows[k] for k in going]
        input_ids = out.sequences.index_select(0, keep)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(new.shape)], dim=1).index_select(0, keep)
        cache = out.cache
        if len(going) < new.shape[0]:
            cache.batch_select_indices(keep)
    return answers


def stop_token_ids(tokenizer, model) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(i for i in ids if i is not None)


def reference_loss(model, tokenizer, example: EvalExample, max_seq_length: int) -> float | None:
    """Mean per-token loss of the reference answer given its prompt (for examples without a final answer)."""
    import torch

    messages = [*example.prompt, {"role": "assistant", "content": example.reference}]
    row = tokenize_conversation(messages, tokenizer, max_seq_length)
    if all(label == IGNORE_INDEX for label in row["labels"]):
        return None
    with torch.no_grad():
        out = model(input_ids=torch.tensor([row["input_ids"]], device=model.device),
                    labels=torch.tensor([row["labels"]], device=model.device), use_cache=False)
    return float(out.loss)


def score(model, tokenizer, examples: list[EvalExample], max_new_tokens: int, batch_size: int,
          max_seq_length: int) -> list[dict[str, Any]]:
    """For each example: the response, its verdict, and (uncheckable ones) the reference's loss.

    `truncated`: the answer hit max_new_tokens without stating a final answer; the verifier's
    fallback (the last expression) would read a number from the unfinished working.
    """
    checkable = [e for e in examples if e.checkable]
    responses = dict(zip(map(id, checkable), generate(model, tokenizer, [e.prompt for e in checkable],
                                                       max_new_tokens, batch_size)))
    results = []
    for example in examples:
        if example.checkable:
            results.append(judge(*responses[id(example)], example.reference))
        else:
            results.append({"reference_loss": reference_loss(model, tokenizer, example, max_seq_length)})
    return results


def judge(response: str, hit_limit: bool, reference: str) -> dict[str, Any]:
    """One answer's result as `score` gives it (also for answers from llama.cpp, mathtune.eval.gguf)."""
    verdict = validate_math_response(response, reference)
    return {"response": response, "predicted": verdict.predicted, "expected": verdict.expected,
            "correct": verdict.correct, "reason": verdict.reason,
            "truncated": hit_limit and not verdict.correct and stated_answer(response) is None}


def protocol(tokenizer, model, examples: list[EvalExample], max_new_tokens: int) -> dict[str, Any]:
    """How the answers were obtained and judged, printed beside every score."""
    from importlib.metadata import version

    systems = {e.prompt[0]["content"] for e in examples if e.prompt and e.prompt[0]["role"] == "system"}
    if not systems:
        system = "no system prompt (the chat template's default, if any)"
    elif len(systems) == 1 and all(e.prompt and e.prompt[0]["role"] == "system" for e in examples):
        system = f"system prompt {_quote(next(iter(systems)))}"
    else:
        system = "the records' own system prompts"
    turns = max((sum(m["role"] == "assistant" for m in e.prompt) for e in examples), default=0)
    shots = "zero-shot" if turns == 0 else f"up to {turns} earlier turns of the record"
    stop = tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer, model))
    return {"prompt": f"the model's chat template, {system}, {shots}", "decoding": "greedy",
            "max_new_tokens": max_new_tokens, "stop_tokens": stop,
            "verifier": f"math-verify {version('math-verify')} (mathtune.verify: last \\boxed{{}}, else the announced "
                        "answer, else the last expression)"}


def _quote(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def evaluate_model(model, tokenizer, examples: list[EvalExample], out_dir: Path, *, base: bool,
                   max_new_tokens: int, batch_size: int, max_seq_length: int,
                   meta: dict | None = None, finetuned: bool = True,
                   baseline: Callable[[], AbstractContextManager] | None = None) -> dict[str, Any]:
    """Score the fine-tuned PEFT model (and its base with the adapter disabled); write out_dir.

    `max_seq_length` (the run's data.max_seq_length) bounds the reference-loss examples;
    finetuned=False scores `model` itself as the base (a model without an adapter). `baseline`
    opens what the "base" column scores instead of the adapter switched off (a run that started
    from an earlier adapter compares with that one; `meta["base_label"]` names it).
    """
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    runs, merged = {}, False
    if finetuned:
        with merged_copy(model) as tuned:
            merged = tuned is not model
            runs["finetuned"] = score(tuned, tokenizer, examples, max_new_tokens, batch_size, max_seq_length)
    if base:
        with (baseline or model.disable_adapter)() if finetuned else nullcontext():
            runs["base"] = score(model, tokenizer, examples, max_new_tokens, batch_size, max_seq_length)
    model.train(was_training)

    summary = {
        **(meta or {}),
        "examples": len(examples),
        "protocol": {**protocol(tokenizer, model, examples, max_new_tokens),
                     **({"finetuned_model": MERGED_NOTE} if merged else {})},
        "models": {name: summarize(examples, results) for name, results in runs.items()},
        "change": paired_change(examples, runs["base"], runs["finetuned"]) if len(runs) == 2 else None,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_eval(out_dir, examples, runs, summary)
    return summary


MERGED_NOTE = ("the adapter merged into a copy of the base weights, as the exports merge it (the products "
               "then round differently from the adapter applied on the fly, which changes some greedy answers)")


@contextmanager
def merged_copy(model):
    """The fine-tuned PEFT model as one plain model: a copy of the base with the adapter merged
    into its weights (PEFT's merge_and_unload), so each layer runs one product instead of three
    and no float32 LoRA products beside a bf16 base; the model itself stays as it was (nothing
    to unmerge, which would leave rounding error in the base). The model itself where a copy
    cannot be made: a 4- or 8-bit base (merging would dequantize it), several adapters, or a copy
    that would take more than a quarter of the memory still available."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    available = probe_memory()["available"]
    usable = (
        hasattr(model, "merge_and_unload")
        and not getattr(model, "is_loaded_in_4bit", False) and not getattr(model, "is_loaded_in_8bit", False)
        and len(getattr(model, "peft_config", {})) == 1
        and available is not None and weights < available / 4
    )
    if not usable:
        yield model
        return
    merged = copy.deepcopy(model).merge_and_unload().eval()
    try:
        yield merged
    finally:
        del merged


def run_conversations(cfg, split: str):
    """The run's own conversations of `split`: "eval" (the held-out split), "train", or "all" (both),
    split as training split them (the same seed)."""
    train_conv, eval_conv = split_conversations(cfg.data, cfg.train.seed)
    if split == "eval":
        return eval_conv
    if split == "train":
        return train_conv
    from datasets import concatenate_datasets

    return concatenate_datasets([train_conv, eval_conv])


def evaluate_run(run_dir: Path, *, data_files: list[Path] | None = None, split: str = "eval",
                 limit: int | None = None, max_new_tokens: int | None = None, batch_size: int | None = None,
                 base: bool = False, bench: str | None = None) -> dict[str, Any]:
    """`mathtune eval`: load the run's base model and adapter, score the chosen examples, write eval/
    (with `bench`: base and fine-tuned on a shipped benchmark, written to bench/NAME/)."""

    cfg = load_run_config(run_dir)
    if bench:
        model, tokenizer = load_trained(run_dir, cfg)
        summaries = run_benches(cfg, model, tokenizer, run_dir, [bench], limit=limit, max_new_tokens=max_new_tokens,
                                batch_size=batch_size)
        warn_about_drops(summaries)
        return summaries[bench]
    if data_files:
        # Another dataset than the run's: detect its shape; keep the run's system prompt.
        data_cfg = cfg.data.model_copy(update={"files": data_files, "format": "auto", "fields": None})
        conversations = load_conversations(data_files, data_cfg, DataReport())
        split = "all"
    else:
        conversations = run_conversations(cfg, split)
    if is_text(conversations):
        model, tokenizer = load_trained(run_dir, cfg)
        documents = conversations.select(range(min(limit, len(conversations)))) if limit else conversations
        return evaluate_text(model, tokenizer, documents, run_dir / EVAL, base, cfg.data.max_seq_length,
                             meta={"data": [str(p) for p in data_files] if data_files else "run", "split": split})
    examples = eval_examples(conversations, limit)
    model, tokenizer = load_trained(run_dir, cfg)
    log.info("Scoring %d examples (%s%s)", len(examples), "fine-tuned and base" if base else "fine-tuned",
             f", {', '.join(map(str, data_files))}" if data_files else f", {split} split")
    summary = evaluate_model(
        model, tokenizer, examples, run_dir / EVAL, base=base,
        max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens, batch_size=batch_size or cfg.eval.batch_size,
        max_seq_length=cfg.data.max_seq_length,
        meta={"data": [str(p) for p in data_files] if data_files else "run", "split": split},
    )
    log.info("\n%s\n\nWritten to %s", comparison_table(summary), run_dir / EVAL)
    warn_about_drops({"these examples": summary})
    return summary


def run_benches(cfg, model, tokenizer, run_dir: Path, names: list[str], *, limit: int | None = None,
                max_new_tokens: int | None = None, batch_size: int | None = None,
                baseline: Callable[[], AbstractContextManager] | None = None,
                meta: dict | None = None) -> dict[str, dict[str, Any]]:
    """Base vs fine-tuned on each shipped benchmark (BENCHES): {name: its summary}."""

    summaries = {}
    for name in names:
        summary = run_bench(model, tokenizer, name, run_dir / BENCH / name, limit=limit or None,
                            max_new_tokens=max_new_tokens, batch_size=batch_size or cfg.eval.batch_size,
                            max_seq_length=cfg.data.max_seq_length, system_prompt=cfg.data.system_prompt,
                            baseline=baseline, meta=meta)
        log.info("\n%s: %s\n%s\n\nWritten to %s", name, summary["data"], comparison_table(summary),
                 run_dir / BENCH / name)
        summaries[name] = summary
    return summaries


# ---------------------------------------------------------------------------------------------
# Shipped benchmarks (data under eval/bench/): did fine-tuning cost the model general math?
#
# General math benchmarks shipped with mathtune: did fine-tuning cost the model general math?
#
#     mathtune eval runs/x --bench gsm8k               # base vs fine-tuned, 300 GSM8K test problems
#     mathtune eval runs/x --bench gsm8k --limit 50    # the first 50 of them (a random sample too)
#     mathtune train --set eval.bench=[gsm8k]          # the same right after training
#
# Narrow fine-tuning often lowers a model's general math ability while it learns the task (reported
# for GSM8K and MATH-500 after SFT in several public projects). A benchmark here is scored exactly
# like the held-out split (`evaluate.evaluate_model`: chat template, greedy answers, math-verify),
# on both models and the same problems, so the paired test tells a real drop from noise; the
# results go to RUN_DIR/bench/NAME/ (summary.json, predictions.jsonl) and into report.html.
#
# - gsm8k: 300 problems of GSM8K's test split (MIT license, Copyright (c) 2021 OpenAI), a seeded
#   random sample; gsm8k/SOURCE.md says how it was drawn and gsm8k/LICENSE is GSM8K's license.
#   Answers are step-by-step, so the token limit is higher than the held-out split's.

BENCH_DATA = Path(__file__).resolve().parent / "bench"


@dataclass(frozen=True)
class Bench:
    file: Path
    description: str
    max_new_tokens: int
    """Long enough for the step-by-step answers the problems call for."""


BENCHES = {
    "gsm8k": Bench(BENCH_DATA / "gsm8k" / "test.jsonl", "GSM8K test, 300-problem seeded sample", 256),
}


def bench_examples(name: str, limit: int | None = None, system_prompt: str | None = None):
    """The benchmark's problems as evaluation examples (the first `limit` of them)."""

    bench = BENCHES[name]
    cfg = DataConfig(files=[bench.file], format="question_answer", system_prompt=system_prompt)
    return eval_examples(load_conversations([bench.file], cfg, DataReport()), limit)


def run_bench(model, tokenizer, name: str, out_dir: Path, *, limit: int | None = None, batch_size: int = 16,
              max_new_tokens: int | None = None, max_seq_length: int = 2048, system_prompt: str | None = None,
              finetuned: bool = True, baseline: Callable[[], AbstractContextManager] | None = None,
              meta: dict | None = None) -> dict[str, Any]:
    """Score the base model (and, with `finetuned`, the PEFT model) on benchmark `name`; write out_dir.
    `baseline` and `meta` as in `evaluate_model` (a run that started from an earlier adapter).

    The same code path as `mathtune eval --bench` and benchmarks/gsm8k_accuracy.py.
    """
    bench = BENCHES[name]
    examples = bench_examples(name, limit, system_prompt)
    log.info("Scoring %s and base answers on %d %s problems (%s)", "fine-tuned" if finetuned else "no other",
             len(examples), name, bench.description)
    return evaluate_model(model, tokenizer, examples, out_dir, base=True, finetuned=finetuned,
                          max_new_tokens=max_new_tokens or bench.max_new_tokens, batch_size=batch_size,
                          max_seq_length=max_seq_length, baseline=baseline,
                          meta={"bench": name, "data": bench.description, "split": "test", **(meta or {})})


def warn_about_drops(summaries: dict[str, dict]) -> None:
    """Log, last, every significant drop from base to fine-tuned ({what was scored: summary})."""
    for what, summary in summaries.items():
        warning = significant_drop(summary, what)
        if warning:
            log.warning("WARNING: %s", warning)


def write_eval(out_dir: Path, examples: list[EvalExample], runs: dict[str, list[dict]], summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, example in enumerate(examples):
        record = {"prompt": example.prompt, "reference": example.reference, "topic": example.topic,
                  "checkable": example.checkable}
        record.update({name: results[i] for name, results in runs.items()})
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    write_text(out_dir / "predictions.jsonl", "".join(lines))
    write_json(out_dir / "summary.json", summary)


# ---------------------------------------------------------------------------------------------
# Plain text: loss and perplexity


def evaluate_text(model, tokenizer, documents, out_dir: Path, base: bool, max_seq_length: int, meta: dict) -> dict:
    """Mean loss per token and perplexity of held-out documents, packed as in training
    (`dataset.pack_documents`), fine-tuned and, with `base`, the base model (adapter disabled)."""

    chunks = pack_documents(documents, tokenizer, max_seq_length)
    models = {"finetuned": text_loss(model, chunks)}
    if base:
        with model.disable_adapter():
            models["base"] = text_loss(model, chunks)
    summary = {**meta, "documents": len(documents), "chunks": len(chunks), "models": models}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "perplexity.json", summary)
    lines = [f"{name:<10} loss {m['loss']:.4f}  perplexity {m['perplexity']:.2f}  ({m['tokens']} tokens)"
             for name, m in models.items()]
    log.info("Plain text: loss and perplexity on %d held-out documents\n%s\n\nWritten to %s", len(documents),
             "\n".join(lines), out_dir / "perplexity.json")
    return summary


def text_loss(model, chunks) -> dict[str, float]:
    """Mean next-token loss over every token of `chunks` (rows of input_ids), one chunk at a time."""
    import torch

    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in chunks:
            ids = torch.tensor([row["input_ids"]], device=model.device)
            predicted = ids.shape[1] - 1  # the first token is predicted by nothing
            total += model(input_ids=ids, labels=ids).loss.item() * predicted
            tokens += predicted
    model.train(was_training)
    mean = total / max(tokens, 1)
    return {"loss": round(mean, 6), "perplexity": perplexity(mean), "tokens": tokens}


def perplexity(loss: float | None) -> float | None:
    """exp(mean loss per trained token): roughly how many tokens the model hesitates between."""
    return None if loss is None else round(math.exp(min(loss, 50.0)), 3)
