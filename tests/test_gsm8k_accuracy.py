"""benchmarks/gsm8k_accuracy.py keeps working, on the code path of `mathtune eval --bench gsm8k`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gsm8k_accuracy.py"


def test_the_benchmark_scores_the_shipped_sample_with_intervals_and_protocol(tmp_path, tiny_llama_dir):
    out = tmp_path / "gsm8k"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_llama_dir), "--limit", "2", "--max-new-tokens", "4",
         "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on GSM8K test, 300-problem seeded sample (2 problems" in run.stdout
    assert "Protocol: the model's chat template" in run.stdout and "at most 4 new tokens" in run.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bench"] == "gsm8k" and list(summary["models"]) == ["base"] and summary["change"] is None
    assert summary["models"]["base"]["checked"] == 2 and "interval" in summary["models"]["base"]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
