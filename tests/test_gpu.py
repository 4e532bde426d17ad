"""CUDA paths: LoRA in bf16, QLoRA (4-bit NF4, double quantization, bf16 compute, gradient checkpointing,
paged 8-bit AdamW), DDP on two GPUs; and scripts/gpu_check.sh's answer on a machine without a GPU.

The `gpu` tests are deselected by default and skipped without CUDA: run them with
`bash scripts/test.sh -m gpu` (scripts/gpu_check.sh does) on a GPU machine.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest
import torch

import mathtune.train.recipe
from mathtune.config import load_config
from mathtune.train.recipe import train
from tests.conftest import ROOT, math_records, write_jsonl
from tests.test_distributed import SETTINGS, set_args, torchrun
from tests.train.test_recipe import adapter_weights, tiny_run_config

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")


@pytest.fixture
def trainers(monkeypatch):
    """The Trainer each train() call builds, to look at its arguments and optimizer afterwards."""
    built = []
    build = mathtune.train.recipe.build_trainer
    monkeypatch.setattr(mathtune.train.recipe, "build_trainer", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    return built


def cuda_config(tmp_path, model_dir, **train_overrides):
    cfg = tiny_run_config(tmp_path, model_dir, **train_overrides)
    cfg.model.device = "cuda"
    cfg.eval.at_end = False
    return cfg


@pytest.mark.gpu
@needs_cuda
def test_lora_in_bf16_on_cuda_learns_and_reports_peak_memory(tmp_path, tiny_llama_dir, trainers):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    cfg = cuda_config(tmp_path, tiny_llama_dir)
    cfg.model.dtype = "bfloat16"
    summary = train(cfg).summary
    (trainer,) = trainers
    assert trainer.args.bf16 and not trainer.args.fp16
    assert summary["device"] == "cuda" and summary["peak_gpu_memory_gb"] > 0
    assert summary["eval_loss_after"] < summary["eval_loss_before"]


@pytest.mark.gpu
@needs_cuda
@needs_bnb
def test_qlora_trains_adapters_on_a_4bit_nf4_base_with_a_paged_8bit_optimizer(tmp_path, tiny_llama_dir, trainers):
    cfg = cuda_config(tmp_path, tiny_llama_dir, gradient_checkpointing=True)
    cfg.model.load_in_4bit = True
    result = train(cfg)
    (trainer,) = trainers

    quantized = [m for m in result.model.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized, "no 4-bit layer in the model"
    for layer in quantized:
        state = layer.weight.quant_state
        assert state.quant_type == "nf4" and state.nested  # nested: double quantization
        assert layer.compute_dtype == torch.bfloat16
    assert trainer.args.optim == "paged_adamw_8bit" and trainer.args.bf16
    optimizer = trainer.optimizer.optimizer  # inside accelerate's wrapper
    assert type(optimizer).__module__.startswith("bitsandbytes") and optimizer.is_paged and optimizer.args.optim_bits == 8
    assert result.model.base_model.model.is_gradient_checkpointing
    lora_b = [t for name, t in adapter_weights(tmp_path / "run").items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: these were trained
    assert result.summary["eval_loss_after"] < result.summary["eval_loss_before"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_with_ddp_train_the_adapter_of_one_gpu(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "math.jsonl", math_records(20))
    common = {**SETTINGS, "model.device": "cuda", "model.dtype": "float32", "eval.at_end": False}
    single = train(load_config(
        overrides={"model.path": str(tiny_llama_dir), "data.files": [str(data)], "train.batch_size": 4,
                   "output.dir": str(tmp_path / "one"), **common}, environ={})).summary
    done = torchrun(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--output", "two",
                     *set_args({**common, "train.batch_size": 2})], cwd=tmp_path, gpus=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["tokens_seen"] == single["tokens_seen"]
    expected, got = adapter_weights(tmp_path / "one"), adapter_weights(tmp_path / "two")
    for name in expected:  # TF32 and NCCL reduction order: looser than on CPU
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-4)


def test_gpu_check_says_why_it_cannot_run_without_a_gpu(tmp_path):
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: run the script itself")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "TMPDIR": str(tmp_path),
                                            "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "gpu_check: no usable CUDA GPU:" in done.stdout
    assert "nothing else can run without a CUDA GPU" in done.stdout
    assert list(tmp_path.iterdir()) == []  # its scratch folder is removed
