"""QLoRA on the CPU: peak memory, tokens/s and loss of a 4-bit run of a 1B- or 7B-shaped model, and the
doctor's estimate for the same plan.

    .venv/bin/python benchmarks/qlora_cpu.py --shape 1b --steps 20      # ~1.1B parameters, tied embeddings
    .venv/bin/python benchmarks/qlora_cpu.py --shape 7b --steps 5       # Mistral-7B shape: ~8 GB file
    .venv/bin/python benchmarks/qlora_cpu.py --source FILE.gguf         # a file of your own (kept)
    .venv/bin/python benchmarks/qlora_cpu.py --shape 1b --untrimmed     # without the heap trimming

It writes a llama-shaped Q8_0 GGUF of the shape (SmolLM2's tokenizer and chat template, random
weights) into --dir, converts it (the cached conversion every run reads), then in child processes:
(1) loads it in 4-bit NF4 and exits, (2) runs `mathtune train` with model.load_in_4bit=true, batch
1 x 512 tokens, gradient checkpointing. For each it prints the peak anonymous memory (RssAnon,
sampled from /proc: what the kernel cannot drop) and the peak resident memory (VmHWM: also the
memory-mapped files' pages); for the run also tokens/s and the training loss at each logged step.
Last, `mathtune doctor`'s estimate for the same plan and its error against the measured peak.
Random weights start near the uniform loss (ln 49152 = 10.8): what falls is LoRA fitting the
examples, which is what a loss that falls shows. Linux only (/proc). Every file it writes is
deleted at the end, --source excepted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.gguf_files import peak_rss_anon, scaled_llama_gguf  # noqa: E402

# layers, hidden, FFN, heads, KV heads, tied embeddings (Llama-3.2-1B's and Mistral-7B's blocks)
SHAPES = {"1b": (16, 2048, 8192, 32, 8, True), "7b": (32, 4096, 14336, 32, 8, False)}
LOAD_ONLY = """
import sys
from mathtune.config import ModelConfig
from mathtune.model.load import load_model
model, _, _ = load_model(ModelConfig(path=sys.argv[1], load_in_4bit=True, device="cpu"))
print("4-bit footprint", model.get_memory_footprint())
"""


UNTRIMMED = """
import sys
from mathtune import hardware
hardware.trim_heap_periodically = lambda *args, **kwargs: False
from mathtune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def long_records(n: int) -> list[dict]:
    """Conversations of ~600 tokens (several bundled problems one after another), so each example
    fills a 512-token row."""
    from mathtune.data.builtin import builtin_files

    pairs = [json.loads(line) for line in Path(builtin_files()[0]).read_text(encoding="utf-8").splitlines()]
    records = []
    for i in range(n):
        messages = []
        for pair in pairs[i * 12:(i + 1) * 12]:
            messages += [{"role": "user", "content": pair["instruction"]},
                         {"role": "assistant", "content": pair["output"]}]
        records.append({"messages": messages})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="1b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dir", type=Path, help="where to write the files (default: a temporary folder)")
    parser.add_argument("--source", type=Path, help="train this GGUF (kept) instead of writing one of --shape")
    parser.add_argument("--untrimmed", action="store_true", help="train without mathtune's heap trimming "
                        "(hardware.trim_heap_periodically), to measure what it saves and costs")
    args = parser.parse_args()
    from mathtune.model.load import embedded_model_path

    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="qlora-cpu-"))
    env = {"MATHTUNE_CACHE": str(work / "cache")}
    try:
        source = args.source or scaled_llama_gguf(work / f"llama-{args.shape}-Q8_0.gguf", embedded_model_path(),
                                                  *SHAPES[args.shape])
        python = [sys.executable, "-m", "mathtune"]
        anon, resident, seconds = peak_rss_anon([*python, "convert", str(source)], env)
        print(f"convert  peak RssAnon {anon / 1e9:5.2f} GB, peak resident {resident / 1e9:5.2f} GB, {seconds:6.1f} s")
        anon, resident, seconds = peak_rss_anon([sys.executable, "-c", LOAD_ONLY, str(source)], env)
        print(f"load 4-bit  peak RssAnon {anon / 1e9:5.2f} GB, peak resident {resident / 1e9:5.2f} GB, {seconds:6.1f} s")

        data = work / "long.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in long_records(8)), encoding="utf-8")
        settings = {"model.load_in_4bit": "true", "model.device": "cpu", "data.max_seq_length": 512,
                    "data.eval_fraction": 0.25, "train.batch_size": 1, "train.gradient_checkpointing": "true",
                    "train.max_steps": args.steps, "train.logging_steps": 1, "train.learning_rate": 1e-3,
                    "train.warmup_ratio": 0, "train.save_steps": 10_000, "eval.at_end": "false"}
        sets = [f"--set={k}={v}" for k, v in settings.items()]
        run = work / "run"
        trainer = [sys.executable, "-c", UNTRIMMED] if args.untrimmed else python
        anon, resident, seconds = peak_rss_anon([*trainer, "train", "--model", str(source), "--data", str(data),
                                                 "--output", str(run), *sets], env)
        summary = json.loads((run / "train_summary.json").read_text())
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                  if "loss" in json.loads(line)]
        print(f"train    peak RssAnon {anon / 1e9:5.2f} GB, peak resident {resident / 1e9:5.2f} GB, {seconds:6.1f} s; "
              f"{summary['tokens_per_second']} tokens/s ({summary['precision']}), {summary['train_seconds']} s "
              f"training; loss by step {' '.join(f'{x:.3f}' for x in losses)}")

        import yaml

        from mathtune.config import parse_override

        nested: dict = {}
        for key, value in (parse_override(f"{k}={v}") for k, v in settings.items()):
            section, name = key.split(".")
            nested.setdefault(section, {})[name] = value
        config = work / "plan.yaml"
        config.write_text(yaml.safe_dump(nested), encoding="utf-8")
        report = json.loads(subprocess.run([*python, "doctor", "--model", str(source), "--config", str(config),
                                            "--device", "cpu", "--json"], capture_output=True, text=True,
                                           env={**os.environ, **env}).stdout)
        estimate = report["estimate"]["bytes"]["total"]
        print(f"doctor   estimate {estimate / 1e9:5.2f} GB against the measured peak RssAnon {anon / 1e9:.2f} GB: "
              f"{100 * (estimate - anon) / anon:+.0f}%")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
