"""General math benchmarks shipped with mathtune: did fine-tuning cost the model general math?

    mathtune eval runs/x --bench gsm8k               # base vs fine-tuned, 300 GSM8K test problems
    mathtune eval runs/x --bench gsm8k --limit 50    # the first 50 of them (a random sample too)
    mathtune train --set eval.bench=[gsm8k]          # the same right after training

Narrow fine-tuning often lowers a model's general math ability while it learns the task (reported
for GSM8K and MATH-500 after SFT in several public projects). A benchmark here is scored exactly
like the held-out split (`evaluate.evaluate_model`: chat template, greedy answers, math-verify),
on both models and the same problems, so the paired test tells a real drop from noise; the
results go to RUN_DIR/bench/NAME/ (summary.json, predictions.jsonl) and into report.html.

- gsm8k: 300 problems of GSM8K's test split (MIT license, Copyright (c) 2021 OpenAI), a seeded
  random sample; gsm8k/SOURCE.md says how it was drawn and gsm8k/LICENSE is GSM8K's license.
  Answers are step-by-step, so the token limit is higher than the held-out split's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("mathtune")

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Bench:
    file: Path
    description: str
    max_new_tokens: int
    """Long enough for the step-by-step answers the problems call for."""


BENCHES = {
    "gsm8k": Bench(HERE / "gsm8k" / "test.jsonl", "GSM8K test, 300-problem seeded sample", 256),
}


def bench_examples(name: str, limit: int | None = None, system_prompt: str | None = None):
    """The benchmark's problems as evaluation examples (the first `limit` of them)."""
    from mathtune.config import DataConfig
    from mathtune.data.dataset import DataReport, load_conversations
    from mathtune.evaluate import eval_examples

    bench = BENCHES[name]
    cfg = DataConfig(files=[bench.file], format="question_answer", system_prompt=system_prompt)
    return eval_examples(load_conversations([bench.file], cfg, DataReport()), limit)


def run_bench(model, tokenizer, name: str, out_dir: Path, *, limit: int | None = None, batch_size: int = 16,
              max_new_tokens: int | None = None, max_seq_length: int = 2048, system_prompt: str | None = None,
              finetuned: bool = True) -> dict[str, Any]:
    """Score the base model (and, with `finetuned`, the PEFT model) on benchmark `name`; write out_dir.

    The same code path as `mathtune eval --bench` and benchmarks/gsm8k_accuracy.py.
    """
    from mathtune.evaluate import evaluate_model

    bench = BENCHES[name]
    examples = bench_examples(name, limit, system_prompt)
    log.info("Scoring %s and base answers on %d %s problems (%s)", "fine-tuned" if finetuned else "no other",
             len(examples), name, bench.description)
    return evaluate_model(model, tokenizer, examples, out_dir, base=True, finetuned=finetuned,
                          max_new_tokens=max_new_tokens or bench.max_new_tokens, batch_size=batch_size,
                          max_seq_length=max_seq_length,
                          meta={"bench": name, "data": bench.description, "split": "test"})
