"""benchmarks/default_run.py measures `mathtune train` from outside, as a first-time user runs it, and
lists every answer that differs between two checkouts. Its runs here are stand-in checkouts whose
`python -m mathtune train` writes a finished run's files (the real default job takes minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "default_run.py"

# A stand-in for `python -m mathtune train --output DIR`: it checks that it runs as a first-time user's
# run does, holds 200 MB for a moment, and writes what a finished default run writes.
FAKE_MAIN = '''
import json, os, sys
from pathlib import Path

home = Path(os.environ["HOME"])
assert Path.cwd().resolve() == home.resolve() and not any(home.iterdir()), "not a new empty home"
assert not [name for name in os.environ if name.startswith("MATHTUNE_")], "MATHTUNE_ variables leaked in"
assert os.environ["HF_HUB_OFFLINE"] == "1"
assert sys.argv[1:3] == ["train", "--output"], sys.argv
out = Path(sys.argv[3])
(out / "eval").mkdir(parents=True)
ballast = b"x" * 200_000_000
(out / "train_summary.json").write_text(json.dumps({"train_seconds": TRAIN, "tokens_per_second": 500.0,
    "precision": "bf16 autocast", "eval_loss_after": 0.4585}))
(out / "eval" / "summary.json").write_text(json.dumps({"seconds": SCORING,
    "models": {"base": {"accuracy": 0.11}, "finetuned": {"accuracy": 0.178}}}))
records = [
    {"prompt": [{"role": "user", "content": "3/5 - 3/4?"}], "topic": "fractions", "checkable": True,
     "finetuned": {"response": "-3/20", "correct": True}, "base": {"response": "2/5", "correct": False}},
    {"prompt": [{"role": "user", "content": "2 + 2?"}], "topic": "arithmetic", "checkable": True,
     "finetuned": {"response": SECOND, "correct": SECOND == "4"}, "base": {"response": "4", "correct": True}},
    {"prompt": [{"role": "user", "content": "What is a prime?"}], "topic": "divisibility", "checkable": False,
     "finetuned": {"reference_loss": 1.5}, "base": {"reference_loss": 2.6}},
]
(out / "eval" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in records))
'''


def fake_checkout(folder: Path, train_seconds: float, scoring_seconds: float, second_answer: str) -> Path:
    (folder / "mathtune").mkdir(parents=True)
    (folder / "mathtune" / "__init__.py").write_text("")
    (folder / "mathtune" / "__main__.py").write_text(
        FAKE_MAIN.replace("TRAIN", repr(train_seconds)).replace("SCORING", repr(scoring_seconds))
        .replace("SECOND", repr(second_answer)))
    return folder


def run_script(*args, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, cwd=cwd, timeout=120)


@pytest.mark.skipif(not hasattr(os, "wait4"), reason="peak memory comes from wait4 (not on Windows)")
def test_alternating_runs_give_the_table_the_speed_ups_and_every_differing_answer(tmp_path):
    before = fake_checkout(tmp_path / "before", train_seconds=100.0, scoring_seconds=40.0, second_answer="5")
    after = fake_checkout(tmp_path / "after", train_seconds=80.0, scoring_seconds=20.0, second_answer="4")
    keep, report = tmp_path / "runs", tmp_path / "report.json"  # --keep given relative to the caller's folder

    run = run_script("--tree", after, "--baseline", before, "--pairs", 2, "--keep", "runs", "--json", report,
                     env={"MATHTUNE_TRAIN__MAX_STEPS": "3", "MATHTUNE_CACHE": str(tmp_path / "cache")}, cwd=tmp_path)

    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.splitlines()[0].startswith("CPU: ") and "bf16 units: " in run.stdout
    rows = [line for line in run.stdout.splitlines() if line.startswith("| baseline") or line.startswith("| this")]
    assert [row.split(" | ")[0] for row in rows] == ["| baseline", "| this", "| baseline", "| this"]
    assert [row.split(" | ")[2] for row in rows] == ["100", "80", "100", "80"]  # training seconds, the runs' own
    assert [row.split(" | ")[4] for row in rows] == ["40.0", "20.0", "40.0", "20.0"]  # scoring seconds
    figures = json.loads(report.read_text())
    # Peak memory is each run's own, from the kernel: the stand-in held 200 MB.
    assert all(0.2e9 < r["peak_rss_bytes"] < 2e9 for r in figures["runs"])
    assert "speed-up over the baseline (medians): whole run " in run.stdout
    assert "training 1.25x, scoring 2.00x" in run.stdout
    # The answers: the checkouts differ in one of the fine-tuned model's, and each checkout agrees with itself.
    assert ("finetuned answers, baseline-1 vs this-1: 1 of 2 identical, 1 worded otherwise, 1 verdicts changed "
            "(line 2 (arithmetic): wrong -> right)") in run.stdout
    assert "base answers, baseline-1 vs this-1: 2 of 2 identical, 0 worded otherwise, 0 verdicts changed" in run.stdout
    for name in ("this", "baseline"):
        assert f"finetuned answers, {name}-1 vs {name}-2: 2 of 2 identical" in run.stdout
    assert figures["answers"]["baseline-1 vs this-1"]["finetuned"]["differing"] == [
        {"line": 2, "topic": "arithmetic", "correct": [False, True]}]
    assert sorted(p.name for p in keep.iterdir() if p.is_dir()) == ["baseline-1", "baseline-2", "this-1", "this-2"]


def test_it_refuses_to_write_runs_into_a_folder_that_holds_something_or_a_file(tmp_path):
    keep = tmp_path / "runs"
    keep.mkdir()
    (keep / "this-1").mkdir()

    run = run_script("--tree", fake_checkout(tmp_path / "tree", 1.0, 1.0, "4"), "--keep", keep)

    assert run.returncode == 2 and f"--keep {keep}: not an empty folder" in run.stderr
    assert not any((keep / "this-1").iterdir())
    (tmp_path / "file").write_text("mine")
    run = run_script("--tree", tmp_path / "tree", "--keep", tmp_path / "file")
    assert run.returncode == 2 and "not an empty folder" in run.stderr and (tmp_path / "file").read_text() == "mine"


def test_a_folder_that_is_not_a_checkout_and_a_failing_run_are_named(tmp_path):
    run = run_script("--tree", tmp_path)
    assert run.returncode == 2 and f"{tmp_path}: not a mathtune checkout" in run.stderr

    broken = fake_checkout(tmp_path / "broken", 1.0, 1.0, "4")
    (broken / "mathtune" / "__main__.py").write_text("raise SystemExit('no model here')")
    run = run_script("--tree", broken)
    assert run.returncode == 1 and "`mathtune train` failed (exit status 1)" in run.stderr
    assert "no model here" in run.stderr


def test_comparing_runs_of_other_problems_names_the_line(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for run, question in ((a, "2 + 2?"), (b, "2 + 3?")):
        (run / "eval").mkdir(parents=True)
        records = [{"prompt": [{"role": "user", "content": "1 + 1?"}], "base": {"response": "2", "correct": True},
                    "finetuned": {"response": "2", "correct": True}},
                   {"prompt": [{"role": "user", "content": question}], "base": {"response": "4", "correct": True},
                    "finetuned": {"response": "4", "correct": True}}]
        (run / "eval" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    run = run_script("--compare", a, b)

    assert run.returncode == 1
    assert f"{a} and {b}: eval/predictions.jsonl line 2 is another problem in each" in run.stderr
