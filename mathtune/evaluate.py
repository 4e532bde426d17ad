"""Verified math accuracy, base vs fine-tuned, overall and per topic.

    mathtune eval runs/x                       # the run's held-out split, fine-tuned model
    mathtune eval runs/x --base --limit 200    # and the base model on the same examples
    mathtune eval runs/x --data ../shared/data/gsm8k/test.jsonl --base

Each example's prompt is its conversation up to the last assistant turn, rendered with the run's
chat template; the model answers greedily (batched, left padding) until its end-of-turn token, and
the answer is checked against the reference's final answer with `verify.validate_math_response`
(math-verify). Accuracy is given per topic: the record's "topic" field, or else the topic that
`data.topics` detects from its text. Records whose reference has no checkable answer (concept
explanations) are left out of accuracy; for them the per-token loss of the reference text is
reported instead.

Writes RUN_DIR/eval/predictions.jsonl (one line per example, both models side by side) and
RUN_DIR/eval/summary.json.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mathtune.data.template import render_chat
from mathtune.data.topics import record_topic
from mathtune.display import percent
from mathtune.files import write_json, write_text
from mathtune.verify import reference_answer, validate_math_response

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


def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers, batched with left padding, stopping at the end-of-turn token."""
    import torch
    from tqdm.auto import tqdm

    texts = [render_chat(tokenizer, p, add_generation_prompt=True) for p in prompts]
    stop = stop_token_ids(tokenizer, model)
    # Similar lengths in one batch waste less on padding; answers are put back in input order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    answers: list[str] = [""] * len(texts)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="Generating", leave=False, dynamic_ncols=True):
            batch = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = enc.to(model.device)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stop,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,
                )
            new = out[:, enc["input_ids"].shape[1] :]
            for i, ids in zip(batch, new):
                answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    finally:
        tokenizer.padding_side = padding_side
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

    from mathtune.data.dataset import IGNORE_INDEX, tokenize_conversation

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
    """For each example: the response, its verdict, and (uncheckable ones) the reference's loss."""
    checkable = [e for e in examples if e.checkable]
    responses = dict(zip(map(id, checkable), generate(model, tokenizer, [e.prompt for e in checkable],
                                                       max_new_tokens, batch_size)))
    results = []
    for example in examples:
        if example.checkable:
            response = responses[id(example)]
            verdict = validate_math_response(response, example.reference)
            results.append({"response": response, "predicted": verdict.predicted, "expected": verdict.expected,
                            "correct": verdict.correct, "reason": verdict.reason})
        else:
            results.append({"reference_loss": reference_loss(model, tokenizer, example, max_seq_length)})
    return results


def summarize(examples: list[EvalExample], results: list[dict]) -> dict[str, Any]:
    """Accuracy overall and per topic over checkable examples; reference loss over the others."""
    by_topic: dict[str, list[bool]] = defaultdict(list)
    losses = []
    for example, result in zip(examples, results):
        if example.checkable:
            by_topic[example.topic].append(result["correct"])
        elif result.get("reference_loss") is not None:
            losses.append(result["reference_loss"])
    flat = [c for values in by_topic.values() for c in values]
    mean_loss = sum(losses) / len(losses) if losses else None
    return {
        "accuracy": _ratio(flat),
        "correct": sum(flat),
        "checked": len(flat),
        "by_topic": {t: {"accuracy": _ratio(v), "correct": sum(v), "checked": len(v)} for t, v in sorted(by_topic.items())},
        "uncheckable": len(examples) - len(flat),
        "reference_loss": round(mean_loss, 6) if mean_loss is not None else None,
        "reference_perplexity": round(math.exp(mean_loss), 4) if mean_loss is not None else None,
    }


def evaluate_model(model, tokenizer, examples: list[EvalExample], out_dir: Path, *, base: bool,
                   max_new_tokens: int, batch_size: int, max_seq_length: int,
                   meta: dict | None = None) -> dict[str, Any]:
    """Score the fine-tuned PEFT model (and its base with the adapter disabled); write eval/.
    `max_seq_length` (the run's data.max_seq_length) bounds the reference-loss examples."""
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    # Not merged for speed (~20% faster): unmerging in place leaves float error in the base weights.
    runs = {"finetuned": score(model, tokenizer, examples, max_new_tokens, batch_size, max_seq_length)}
    if base:
        with model.disable_adapter():
            runs["base"] = score(model, tokenizer, examples, max_new_tokens, batch_size, max_seq_length)
    model.train(was_training)

    summary = {
        **(meta or {}),
        "examples": len(examples),
        "max_new_tokens": max_new_tokens,
        "models": {name: summarize(examples, results) for name, results in runs.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_eval(out_dir, examples, runs, summary)
    return summary


def evaluate_run(run_dir: Path, *, data_files: list[Path] | None = None, split: str = "eval",
                 limit: int | None = None, max_new_tokens: int | None = None, batch_size: int | None = None,
                 base: bool = False) -> dict[str, Any]:
    """`mathtune eval`: load the run's base model and adapter, score the chosen examples, write eval/."""
    from mathtune.config import load_run_config
    from mathtune.data.dataset import DataReport, load_conversations, split_conversations

    cfg = load_run_config(run_dir)
    if data_files:
        # Another dataset than the run's: detect its shape; keep the run's system prompt.
        data_cfg = cfg.data.model_copy(update={"files": data_files, "format": "auto", "fields": None})
        conversations = load_conversations(data_files, data_cfg, DataReport())
        split = "all"
    else:
        train_conv, eval_conv = split_conversations(cfg.data, cfg.train.seed)
        conversations = {"eval": eval_conv, "train": train_conv}.get(split)
        if conversations is None:
            from datasets import concatenate_datasets

            conversations = concatenate_datasets([train_conv, eval_conv])
    examples = eval_examples(conversations, limit)
    from mathtune.model import load_trained

    model, tokenizer = load_trained(run_dir, cfg)
    log.info("Scoring %d examples (%s%s)", len(examples), "fine-tuned and base" if base else "fine-tuned",
             f", {', '.join(map(str, data_files))}" if data_files else f", {split} split")
    summary = evaluate_model(
        model, tokenizer, examples, run_dir / "eval", base=base,
        max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens, batch_size=batch_size or cfg.eval.batch_size,
        max_seq_length=cfg.data.max_seq_length,
        meta={"data": [str(p) for p in data_files] if data_files else "run", "split": split},
    )
    log.info("\n%s\n\nWritten to %s", comparison_table(summary), run_dir / "eval")
    return summary


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


def comparison_table(summary: dict) -> str:
    """Accuracy per topic, fine-tuned vs base (when evaluated), with the difference and the counts."""
    models = summary["models"]
    tuned, base = models["finetuned"], models.get("base")
    rows = [("topic", "n", "base", "fine-tuned", "change")] if base else [("topic", "n", "fine-tuned", "")]
    topics = [*tuned["by_topic"], "all"]
    for topic in topics:
        t = tuned if topic == "all" else tuned["by_topic"][topic]
        if base:
            b = base if topic == "all" else base["by_topic"][topic]
            rows.append((topic, str(t["checked"]), percent(b["accuracy"]), percent(t["accuracy"]),
                         f"{100 * (t['accuracy'] - b['accuracy']):+.1f}"))
        else:
            rows.append((topic, str(t["checked"]), percent(t["accuracy"]), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
            for r in rows]
    text.insert(1, "  ".join("-" * w for w in widths))
    if tuned["uncheckable"]:
        loss = f"fine-tuned {tuned['reference_loss']}" + (f", base {base['reference_loss']}" if base else "")
        text.append(f"{tuned['uncheckable']} examples without a checkable answer: reference loss per token {loss}")
    return "\n".join(text)


def _ratio(values: list[bool]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


