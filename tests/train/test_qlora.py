"""QLoRA settings: the optimizer chosen for a 4-bit base, what is refused without CUDA or bitsandbytes,
and what reaches the Trainer. The CUDA runs themselves are in tests/test_gpu.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import mathtune.hardware
import mathtune.train.recipe
from mathtune.config import load_config, resolve_optimizer
from mathtune.errors import ConfigError
from mathtune.train.recipe import _compute_dtype, train
from tests.train.test_recipe import tiny_run_config

NO_ENV: dict = {}


@pytest.fixture
def cuda_with_bitsandbytes(monkeypatch):
    monkeypatch.setattr(mathtune.hardware, "cuda_available", lambda: True)
    monkeypatch.setattr(mathtune.hardware, "bitsandbytes_available", lambda: True)


def test_auto_optimizer_is_paged_8bit_adamw_for_qlora_and_torch_adamw_otherwise(cuda_with_bitsandbytes):
    qlora = load_config(None, {"model.load_in_4bit": True}, environ=NO_ENV)
    assert qlora.train.optimizer == "auto" and resolve_optimizer(qlora) == "paged_adamw_8bit"
    assert resolve_optimizer(load_config(None, {}, environ=NO_ENV)) == "adamw_torch"
    chosen = load_config(None, {"model.load_in_4bit": True, "train.optimizer": "paged_adamw_32bit"}, environ=NO_ENV)
    assert resolve_optimizer(chosen) == "paged_adamw_32bit"


@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit"])
def test_a_bitsandbytes_optimizer_without_cuda_is_refused_with_the_alternative(monkeypatch, optimizer):
    monkeypatch.setattr(mathtune.hardware, "cuda_available", lambda: False)
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {"train.optimizer": optimizer}, environ=NO_ENV)  # model.device: auto
    (problem,) = excinfo.value.problems
    assert problem == (f"train.optimizer: '{optimizer}' runs on CUDA through bitsandbytes, but no CUDA GPU is "
                       "usable here; use adamw_torch (or auto)")


def test_a_paged_optimizer_on_mps_is_refused(monkeypatch):
    monkeypatch.setattr(mathtune.hardware, "cuda_available", lambda: True)
    with pytest.raises(ConfigError, match="train.optimizer: 'paged_adamw_8bit' runs on CUDA through bitsandbytes, "
                                          "but model.device is 'mps'"):
        load_config(None, {"train.optimizer": "paged_adamw_8bit", "model.device": "mps"}, environ=NO_ENV)


def test_qlora_without_bitsandbytes_names_the_package_once_for_both_keys(monkeypatch):
    monkeypatch.setattr(mathtune.hardware, "cuda_available", lambda: True)
    monkeypatch.setattr(mathtune.hardware, "bitsandbytes_available", lambda: False)
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {"model.load_in_4bit": True, "train.optimizer": "paged_adamw_8bit"}, environ=NO_ENV)
    (problem,) = excinfo.value.problems
    assert problem.startswith("model.load_in_4bit and train.optimizer: needs the bitsandbytes package")
    assert "pip install 'mathtune[qlora]'" in problem


def test_qlora_on_this_cpu_machine_is_refused_without_patching():
    if mathtune.hardware.cuda_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {"model.load_in_4bit": True, "train.optimizer": "paged_adamw_8bit"}, environ=NO_ENV)
    text = "\n".join(excinfo.value.problems)
    assert "model.load_in_4bit: 4-bit QLoRA needs a CUDA GPU" in text and "train.optimizer: 'paged_adamw_8bit'" in text


def test_a_4bit_base_trains_in_its_compute_dtype_though_its_other_weights_are_float32():
    fp32 = [torch.nn.Parameter(torch.zeros(1))]
    for quant in (SimpleNamespace(bnb_4bit_compute_dtype=torch.bfloat16), {"bnb_4bit_compute_dtype": "bfloat16"}):
        model = SimpleNamespace(config=SimpleNamespace(quantization_config=quant), is_loaded_in_4bit=True,
                                parameters=lambda: iter(fp32))
        assert _compute_dtype(model) == torch.bfloat16
    fp16 = [torch.nn.Parameter(torch.zeros(1, dtype=torch.float16))]
    plain = SimpleNamespace(config=SimpleNamespace(), parameters=lambda: iter(fp16))
    assert _compute_dtype(plain) == torch.float16


def test_the_trainer_gets_the_resolved_optimizer_and_evaluates_inside_train(tmp_path, tiny_llama_dir, monkeypatch):
    trainers = []
    build = mathtune.train.recipe.build_trainer
    monkeypatch.setattr(mathtune.train.recipe, "build_trainer", lambda *a, **k: trainers.append(build(*a, **k)) or trainers[-1])
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, max_steps=2, eval_steps=1)
    cfg.eval.at_end = False
    summary = train(cfg).summary
    (trainer,) = trainers
    assert trainer.args.optim == "adamw_torch" and trainer.args.ddp_find_unused_parameters is False
    # The loss before training is taken by train() itself (see train.py: evaluate() first breaks DDP),
    # and it is the step-0 one, not the first periodic evaluation.
    evals = {e["step"]: e["eval_loss"] for e in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in e}
    assert trainer.args.eval_on_start is True and sorted(evals) == [0, 1, 2]
    assert summary["eval_loss_before"] == round(evals[0], 6) != round(evals[2], 6)  # step 1 ran at lr 0 (warmup)
    assert summary["processes"] == 1 and summary["engine"] is None and summary["peak_gpu_memory_gb"] is None
