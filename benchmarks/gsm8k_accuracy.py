"""GSM8K accuracy of a model (the embedded SmolLM2 by default) on the sample shipped with mathtune.

    .venv/bin/python benchmarks/gsm8k_accuracy.py --limit 100
    .venv/bin/python benchmarks/gsm8k_accuracy.py --model ~/models/x.gguf --adapter runs/x --limit 300

The code path of `mathtune eval RUN --bench gsm8k` (mathtune.eval.evaluate.run_bench): the 300-problem
seeded sample of GSM8K's test split in mathtune/eval/bench/gsm8k, the model's chat template, greedy
batched answers up to 256 new tokens, math-verify. Without --adapter the model is scored alone;
with one, base and fine-tuned on the same problems with the paired test. Prints the accuracy
table (95% intervals, protocol) and writes summary.json and predictions.jsonl to --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mathtune.config import ModelConfig
from mathtune.data.tokenize import ensure_chat_template
from mathtune.eval.accuracy import comparison_table
from mathtune.eval.evaluate import BENCHES, run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model.path (default: the embedded SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--adapter", type=Path, help="a run folder whose adapter/ to apply (then base vs fine-tuned)")
    parser.add_argument("--limit", type=int, default=100, help="the first N problems of the sample (default 100)")
    parser.add_argument("--max-new-tokens", type=int, default=BENCHES["gsm8k"].max_new_tokens)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("gsm8k_accuracy"), help="folder for summary.json and "
                        "predictions.jsonl")
    args = parser.parse_args()

    from mathtune.model.load import load_model

    model, tokenizer, source = load_model(ModelConfig(path=args.model))
    ensure_chat_template(tokenizer, None)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter / "adapter")
    started = time.perf_counter()
    summary = run_bench(model, tokenizer, "gsm8k", args.out, limit=args.limit, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, finetuned=args.adapter is not None)
    name = Path(source.path).name + (f" + {args.adapter}/adapter" if args.adapter else "")
    print(f"{name} on {summary['data']} ({summary['examples']} problems, {time.perf_counter() - started:.0f} s):\n"
          f"{comparison_table(summary)}\nAnswers in {args.out}")


if __name__ == "__main__":
    main()
