"""The default job as a user meets it (`mathtune train`, no arguments), measured from outside: the
whole run's wall time and peak memory, its training and scoring time, and its answers; against
another checkout, alternating, with every answer that differs between them.

    .venv/bin/python benchmarks/default_run.py                          # this checkout, once
    git worktree add ../before <commit>
    .venv/bin/python benchmarks/default_run.py --baseline ../before --pairs 2   # before, this, before, this
    .venv/bin/python benchmarks/default_run.py --compare RUN_A RUN_B    # two finished runs' answers

Each run is `python -m mathtune train --output DIR` in its own process, with the checkout first on
PYTHONPATH (the same Python environment for both), a new empty home folder (so the GGUF is
converted afresh, as on a first run: the issue's "fresh clone, fresh HOME"), no MATHTUNE_*
variables and the hubs offline. Peak resident memory is the kernel's (wait4; not on Windows).
Training seconds and tokens/s are the run's own (train_summary.json), scoring seconds too
(eval/summary.json: base and fine-tuned answers, 82 held-out problems).

The answers: greedy decoding gives the same tokens for the same weights and the same kernels, so two
runs of one checkout should agree answer for answer (the first pair of a tree is compared when it
ran twice), and any answer that differs between the checkouts is listed with its verdicts: a change
in the fine-tuned model's answers follows from any change in how training rounds; a change in the
base model's answers means the answering itself changed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import gigabytes, wait_with_peak_rss  # benchmarks/, beside this script

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("base", "finetuned")


def run_default(tree: Path, out: Path, log: Path) -> dict:
    """`mathtune train --output out` from `tree`, as a first-time user runs it; its figures."""
    with tempfile.TemporaryDirectory(prefix="mathtune-home-") as home, open(log, "w", encoding="utf-8") as sink:
        env = {name: value for name, value in os.environ.items() if not name.startswith("MATHTUNE_")}
        env.update(HOME=home, USERPROFILE=home, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        started = time.perf_counter()
        # In the home folder, so that nothing in the caller's folder is read as the run's.
        proc = subprocess.Popen([sys.executable, "-m", "mathtune", "train", "--output", str(out)], cwd=home, env=env,
                                stdout=sink, stderr=subprocess.STDOUT)
        peak = wait_with_peak_rss(proc)
        wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"{tree}: `mathtune train` failed (exit status {proc.returncode}); the end of {log}:\n{tail}")
    return {"tree": str(tree), "wall_seconds": round(wall, 1), "peak_rss_bytes": peak,
            **run_figures(out)}


def run_figures(run: Path) -> dict:
    """What a finished run says of itself: training time and speed, scoring time, accuracies."""
    train = _read_json(run / "train_summary.json")
    evaluation = _read_json(run / "eval" / "summary.json")
    try:
        return {"train_seconds": train["train_seconds"], "tokens_per_second": train["tokens_per_second"],
                "precision": train["precision"], "eval_loss_after": train["eval_loss_after"],
                "scoring_seconds": evaluation["seconds"],
                **{f"{model}_accuracy": evaluation["models"][model]["accuracy"] for model in MODELS}}
    except KeyError as err:
        raise SystemExit(f"{run}: its train_summary.json or eval/summary.json has no {err} (not a finished "
                         "default run with scoring?)") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SystemExit(f"{path}: missing (not a finished default run with scoring?)") from None
    except json.JSONDecodeError as err:
        raise SystemExit(f"{path}: not JSON ({err})") from None


def read_predictions(run: Path) -> list[dict]:
    path = run / "eval" / "predictions.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SystemExit(f"{path}: missing (not a finished default run with scoring?)") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise SystemExit(f"{path}, line {number}: not JSON ({err})") from None
    return records


def compare_answers(run_a: Path, run_b: Path) -> dict:
    """For each model, how many answers of the two runs are the same text, and every one that is not:
    its line in eval/predictions.jsonl, topic and verdict in each run. Fails, naming the line, where
    the runs did not answer the same problems."""
    a, b = read_predictions(run_a), read_predictions(run_b)
    if len(a) != len(b):
        raise SystemExit(f"{run_a} and {run_b} scored different problems: {len(a)} and {len(b)} predictions")
    result = {model: {"answers": 0, "identical": 0, "differing": []} for model in MODELS}
    for line, (x, y) in enumerate(zip(a, b), 1):
        if x.get("prompt") != y.get("prompt"):
            raise SystemExit(f"{run_a} and {run_b}: eval/predictions.jsonl line {line} is another problem in each")
        for model in MODELS:
            if "response" not in x.get(model, {}):  # no checkable answer: scored by its reference's loss
                continue
            counts = result[model]
            counts["answers"] += 1
            if x[model]["response"] == y[model]["response"]:
                counts["identical"] += 1
            else:
                counts["differing"].append({"line": line, "topic": x.get("topic"), "correct": [x[model]["correct"],
                                                                                              y[model]["correct"]]})
    return result


def describe_comparison(name_a: str, name_b: str, comparison: dict) -> list[str]:
    lines = []
    for model in MODELS:
        counts = comparison[model]
        changed = [d for d in counts["differing"] if d["correct"][0] != d["correct"][1]]
        verdicts = "; ".join(f"line {d['line']} ({d['topic']}): {_verdict(d['correct'][0])} -> "
                             f"{_verdict(d['correct'][1])}" for d in changed)
        lines.append(f"{model} answers, {name_a} vs {name_b}: {counts['identical']} of {counts['answers']} identical, "
                     f"{len(counts['differing'])} worded otherwise, {len(changed)} verdicts changed"
                     + (f" ({verdicts})" if verdicts else ""))
    return lines


def _verdict(correct: bool) -> str:
    return "right" if correct else "wrong"


def table(runs: list[dict], names: dict[str, str]) -> list[str]:
    cols = ["run", "wall", "training s", "tokens/s", "scoring s", "peak RSS GB", "base", "fine-tuned", "eval loss"]
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    for run in runs:
        minutes, seconds = divmod(round(run["wall_seconds"]), 60)
        lines.append(f"| {names[run['tree']]} | {minutes}:{seconds:02d} | {run['train_seconds']:.0f} | "
                     f"{run['tokens_per_second']:.0f} | {run['scoring_seconds']:.1f} | {gigabytes(run['peak_rss_bytes'])} | "
                     f"{run['base_accuracy']:.1%} | {run['finetuned_accuracy']:.1%} | {run['eval_loss_after']:.4f} |")
    return lines


def speedups(runs: list[dict], baseline: str, tree: str) -> str:
    """Median baseline seconds / median tree seconds, for the whole run, training and scoring."""
    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["tree"] == name)

    parts = [f"{label} {median(baseline, key) / median(tree, key):.2f}x"
             for label, key in (("whole run", "wall_seconds"), ("training", "train_seconds"),
                                ("scoring", "scoring_seconds"))]
    return "speed-up over the baseline (medians): " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout to measure (default: this one)")
    parser.add_argument("--baseline", type=Path, help="another checkout, run alternately before it")
    parser.add_argument("--pairs", type=int, default=1, help="runs of each checkout (default 1)")
    parser.add_argument("--keep", type=Path, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures and comparisons here")
    parser.add_argument("--compare", type=Path, nargs=2, metavar="RUN", help="only compare two finished runs' answers")
    args = parser.parse_args(argv)

    if args.compare:
        print("\n".join(describe_comparison(str(args.compare[0]), str(args.compare[1]), compare_answers(*args.compare))))
        return 0
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    trees = [path.resolve() for path in ([args.baseline] if args.baseline else []) + [args.tree]]
    if len(set(trees)) < len(trees):
        parser.error("--baseline is the checkout measured (--tree): name another one")
    for tree in trees:
        if not (tree / "mathtune" / "__main__.py").is_file():
            parser.error(f"{tree}: not a mathtune checkout (no mathtune/__main__.py)")
    if args.keep and args.keep.exists() and (not args.keep.is_dir() or any(args.keep.iterdir())):
        parser.error(f"--keep {args.keep}: not an empty folder; its runs would overwrite what it holds")
    names = {str(trees[-1]): "this"} | ({str(trees[0]): "baseline"} if args.baseline else {})

    from mathtune.hardware import cpu_bf16_units, cpu_model

    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, bf16 units: {cpu_bf16_units() or 'none'}", flush=True)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mathtune-default-run-") as scratch:
        folder = (args.keep or Path(scratch)).resolve()  # absolute: each run works in its new home folder
        folder.mkdir(parents=True, exist_ok=True)
        for pair in range(1, args.pairs + 1):
            for tree in trees:
                name = f"{names[str(tree)]}-{pair}"
                print(f"{name}: mathtune train ({tree})", flush=True)
                runs.append(run_default(tree, folder / name, folder / f"{name}.log"))
                print(f"{name}: {runs[-1]['wall_seconds']:.0f} s", flush=True)
        lines = table(runs, names)
        comparisons = {}
        if args.baseline:
            lines.append(speedups(runs, str(trees[0]), str(trees[1])))
            comparisons["baseline-1 vs this-1"] = compare_answers(folder / "baseline-1", folder / "this-1")
        if args.pairs > 1:
            for name in names.values():
                comparisons[f"{name}-1 vs {name}-2"] = compare_answers(folder / f"{name}-1", folder / f"{name}-2")
        for label, comparison in comparisons.items():
            lines += describe_comparison(*label.split(" vs "), comparison)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "answers": comparisons}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
