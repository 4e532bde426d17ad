"""benchmarks/train_throughput.py keeps working: a two-step run of both tools on a tiny llama."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "train_throughput.py"


def test_both_tools_train_on_the_same_tokens_and_the_table_has_the_ratios(tmp_path, tiny_llama_dir):
    out = tmp_path / "result.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(tiny_llama_dir), "--data", "bundled", "--steps", "3",
         "--warmup", "1", "--batch-size", "4", "--max-seq-length", "128", "--eval-examples", "2", "--threads", "1",
         "--reference-bf16", "yes", "--profile", "--json", str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[1].startswith("CPU: ") and "bf16 units: " in lines[1] and "mathtune trains in " in lines[1]
    for name in ("mathtune / reference ", "mathtune / reference bf16=True "):
        assert next(line for line in lines if line.startswith(name)).count("x") >= 4, run.stdout
    assert any(line.startswith("same real tokens in every step: yes") and "same initial LoRA weights: yes" in line
               for line in lines), run.stdout

    # --profile: one timed step of each row under torch.profiler, its top operators by own time.
    for name in ("mathtune", "reference (Trainer+PEFT)", "reference bf16=True"):
        assert f"{name}: one step (step 2) under torch.profiler, top operators by own time" in run.stdout
    assert run.stdout.count("Self CPU time total") == 3 and "aten::mm" in run.stdout

    # The matrix ceiling: the products of mathtune's first (untimed) step, both rates.
    line = next(line for line in lines if line.startswith("matrix ceiling (mathtune's first step: "))
    assert "at the large-product rate" in line and "at the products' own rate (replayed" in line

    results = json.loads(out.read_text())["results"]
    mathtune, reference, reference_bf16 = results["mathtune"], results["reference"], results["reference-bf16"]
    assert mathtune["step_tokens"] == reference["step_tokens"] == reference_bf16["step_tokens"]
    assert len(mathtune["step_tokens"]) == 3
    ceiling = mathtune["matrix_ceiling"]
    assert ceiling["tokens"] == mathtune["step_tokens"][0] and ceiling["products"] > ceiling["distinct_products"] > 0
    assert ceiling["large_product_tokens_per_second"] > 0 and ceiling["replayed_tokens_per_second"] > 0
    assert reference["matrix_ceiling"] is None and reference_bf16["matrix_ceiling"] is None
    assert reference["precision"] == "float32" and reference_bf16["precision"] == "bf16 autocast, float32 weights"
    # mathtune bounds oneDNN's and ideep's kernel caches; the references, which import mathtune.data,
    # keep the defaults.
    for cache in ("onednn_kernel_cache", "ideep_kernel_cache"):
        assert mathtune[cache] == "64"
        assert reference[cache] == reference_bf16[cache] == "1024"
    for result in (mathtune, reference, reference_bf16):
        assert result["tokens_per_second"] > 0 and result["peak_rss_bytes"] > 50e6
        assert result["threads"] == 1 and result["optimizer_floats"] == 2 * result["trainable"]
        assert len(result["train_losses"]) == 3 and result["held_out_loss"] > 0
    # Same network, same examples, same initial adapter: the losses agree closely.
    assert mathtune["held_out_loss"] == pytest.approx(reference["held_out_loss"], rel=1e-2)
    assert reference_bf16["held_out_loss"] == pytest.approx(reference["held_out_loss"], rel=1e-2)


def _benchmark_module(name: str):
    """A module of benchmarks/ (a folder of scripts, not a package), as the scripts import each other."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_throughput_counts_only_the_steps_after_the_warm_up():
    tt = _benchmark_module("train_throughput")
    median_step_throughput, model_flops_utilisation = tt.median_step_throughput, tt.model_flops_utilisation
    peak_tflops_for, throughput = tt.peak_tflops_for, tt.throughput
    marks = [[0.0, 0], [10.0, 100], [12.0, 300], [13.0, 400]]  # a slow first step
    assert throughput(marks, warmup=1) == pytest.approx(300 / 3.0)
    assert throughput(marks, warmup=0) == pytest.approx(400 / 13.0)
    assert median_step_throughput(marks, warmup=1) == pytest.approx(100.0)  # steps at 100 and 100 tok/s
    assert median_step_throughput([[0.0, 0], [1.0, 10], [2.0, 40], [12.0, 50]], warmup=0) == pytest.approx(10.0)
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops_for("cpu") is None
    # 135M parameters at 100k tokens/s on a 989 TFLOP/s GPU: 6 * 1.35e8 * 1e5 / 9.89e14
    assert model_flops_utilisation(135_000_000, 100_000.0, 989.0) == pytest.approx(0.0819, rel=1e-3)
    assert model_flops_utilisation(135_000_000, 100_000.0, None) is None


def test_the_recorder_sees_every_product_of_the_backward_pass_in_the_dtype_autocast_chose(monkeypatch):
    torch = pytest.importorskip("torch")
    mc = _benchmark_module("matrix_ceiling")
    layer = torch.nn.Linear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    with mc.ProductRecorder() as recorder, torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()
    # Forward (5 x 16 @ 16 x 8, with the bias: addmm), then the gradients of x (5 x 8 @ 8 x 16) and
    # of the weight (8 x 5 @ 5 x 16).
    assert sorted(key[0] for key in recorder.products) == ["addmm", "mm", "mm"]
    assert {key[1][2] for key in recorder.products} == {"bfloat16"}
    forward = next(key for key in recorder.products if key[0] == "addmm")
    assert forward[2] == ((16, 8), (1, 16), "bfloat16")  # the weight, transposed: replayed as laid out
    flops = sum(count * mc.product_flops(key) for key, count in recorder.products.items())
    assert flops == 3 * 2 * 5 * 16 * 8
    assert mc.product_flops(("bmm", ((3, 4, 5), (20, 5, 1), "float32"), ((3, 5, 6), (30, 6, 1), "float32"))) == 720
    with mc.ProductRecorder() as in_place:  # LoRA's update and gradient are added in place (train/lora.py)
        torch.zeros(5, 8).addmm_(torch.randn(5, 16), torch.randn(16, 8))
    assert [(key[0], mc.product_flops(key)) for key in in_place.products] == [("addmm_", 2 * 5 * 16 * 8)]

    monkeypatch.setattr(mc, "large_product_rate", lambda dtype: 1e10)
    ceiling = mc.matrix_ceiling(recorder.products, tokens=5)
    assert ceiling["flops_per_token"] == flops / 5 and ceiling["dtype"] == "bfloat16"
    assert ceiling["large_product_tokens_per_second"] == pytest.approx(1e10 * 5 / flops)
    assert ceiling["replayed_seconds"] > 0 and sum(s["count"] for s in ceiling["shapes"]) == 3
    assert ceiling["replayed_tokens_per_second"] == pytest.approx(5 / ceiling["replayed_seconds"])
    assert "mathtune reaches 50.0%" in mc.describe(ceiling, ceiling["large_product_tokens_per_second"] / 2)
    assert "machine was busy" not in mc.describe(ceiling, ceiling["replayed_tokens_per_second"] / 2)
    assert "machine was busy" in mc.describe(ceiling, ceiling["replayed_tokens_per_second"] * 2)


def test_a_product_is_timed_at_its_best_repeat_not_while_the_machine_was_busy():
    """Another process only ever slows a timing down: the first repeat's calls (the machine busy)
    take 20 ms, the later ones 1 ms, and the time per call is the later repeats'."""
    mc = _benchmark_module("matrix_ceiling")
    calls = []

    def run():
        calls.append(None)
        time.sleep(0.02 if len(calls) <= 4 else 0.001)  # the untimed call and the first repeat's 3

    assert mc.seconds_per_call(run, min_seconds=0, min_calls=3, repeats=3) < 0.01
    assert len(calls) == 1 + 3 * 3


@pytest.mark.gpu
def test_cuda_mode_reports_gpu_memory_and_mfu(tmp_path, tiny_llama_dir):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = tmp_path / "result.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cuda", "--model", str(tiny_llama_dir), "--data", "bundled",
         "--steps", "3", "--warmup", "1", "--batch-size", "4", "--max-seq-length", "128", "--eval-examples", "2",
         "--peak-tflops", "100", "--json", str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "bfloat16" in run.stdout and "MFU" in run.stdout
    for result in json.loads(out.read_text())["results"].values():
        assert result["cuda_peak_bytes"] > 0 and result["device_name"] != "cpu"
