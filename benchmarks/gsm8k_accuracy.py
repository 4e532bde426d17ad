"""GSM8K test accuracy of a model (the embedded SmolLM2 by default), checked with math-verify.

    .venv/bin/python benchmarks/gsm8k_accuracy.py --limit 200
    .venv/bin/python benchmarks/gsm8k_accuracy.py --model ~/models/x.gguf --adapter runs/x --limit 500

The same path as `mathtune eval` (chat template, greedy batched generation, validate_math_response)
with no GSM8K-specific code beyond the file name: the `#### 72` references are read by the verifier.
Prints accuracy with a 95% Wilson interval and writes every answer to --out (JSONL).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from mathtune.config import DataConfig, ModelConfig
from mathtune.data.dataset import DataReport, ensure_chat_template, load_conversations
from mathtune.evaluate import eval_examples, score, summarize

ROOT = Path(__file__).resolve().parents[1]
GSM8K_TEST = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model.path (default: the embedded SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--adapter", type=Path, help="a run folder whose adapter/ to apply")
    parser.add_argument("--data", type=Path, default=GSM8K_TEST)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("gsm8k_predictions.jsonl"))
    args = parser.parse_args()

    from mathtune.model import load_model

    model, tokenizer, source = load_model(ModelConfig(path=args.model))
    ensure_chat_template(tokenizer, None)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter / "adapter")
    model.eval()
    conversations = load_conversations([args.data], DataConfig(files=[args.data]), DataReport())
    examples = eval_examples(conversations, args.limit)

    started = time.perf_counter()
    results = score(model, tokenizer, examples, args.max_new_tokens, args.batch_size, DataConfig().max_seq_length)
    seconds = time.perf_counter() - started
    summary = summarize(examples, results)
    low, high = wilson(summary["correct"], summary["checked"])
    with args.out.open("w", encoding="utf-8") as fh:
        for example, result in zip(examples, results):
            fh.write(json.dumps({"question": example.prompt[-1]["content"], "reference": example.reference, **result},
                                ensure_ascii=False) + "\n")
    name = Path(source.path).name + (f" + {args.adapter}/adapter" if args.adapter else "")
    print(f"{name} on {args.data.name}: {summary['correct']}/{summary['checked']} = "
          f"{100 * summary['accuracy']:.1f}% (95% CI {100 * low:.1f}-{100 * high:.1f}%), "
          f"max {args.max_new_tokens} new tokens, {seconds:.0f} s; answers in {args.out}")


if __name__ == "__main__":
    main()
