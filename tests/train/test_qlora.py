"""QLoRA: the optimizer chosen for a 4-bit base, what is refused (bitsandbytes missing, paged optimizers
without a GPU, MPS), what reaches the Trainer, and whole QLoRA runs on the CPU (train, resume, eval,
exports). The CUDA runs themselves are in tests/test_gpu.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import mathtune.hardware
import mathtune.train.recipe
from mathtune.config import load_config, resolve_optimizer
from mathtune.errors import ConfigError
from mathtune.export import export_run
from mathtune.train.recipe import _compute_dtype, train
from tests.conftest import save_tiny_model
from tests.train.test_recipe import tiny_run_config

NO_ENV: dict = {}


@pytest.fixture
def cuda_with_bitsandbytes(monkeypatch):
    monkeypatch.setattr(mathtune.hardware, "cuda_available", lambda: True)
    monkeypatch.setattr(mathtune.hardware, "bitsandbytes_available", lambda: True)


def test_auto_optimizer_is_paged_8bit_adamw_for_qlora_and_fused_torch_adamw_otherwise(cuda_with_bitsandbytes,
                                                                                        monkeypatch):
    qlora = load_config(None, {"model.load_in_4bit": True}, environ=NO_ENV)
    assert qlora.train.optimizer == "auto" and resolve_optimizer(qlora) == "paged_adamw_8bit"
    monkeypatch.setattr(mathtune.hardware, "torch_version", lambda: (2, 8, 0))
    assert resolve_optimizer(load_config(None, {}, environ=NO_ENV)) == "adamw_torch_fused"
    monkeypatch.setattr(mathtune.hardware, "torch_version", lambda: (2, 7, 1))  # transformers' default is unfused there
    assert resolve_optimizer(load_config(None, {}, environ=NO_ENV)) == "adamw_torch"
    chosen = load_config(None, {"model.load_in_4bit": True, "train.optimizer": "paged_adamw_32bit"}, environ=NO_ENV)
    assert resolve_optimizer(chosen) == "paged_adamw_32bit"


@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_a_paged_optimizer_without_cuda_is_refused_with_the_alternatives(monkeypatch, optimizer):
    monkeypatch.setattr(mathtune.hardware, "cuda_available", lambda: False)
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {"train.optimizer": optimizer}, environ=NO_ENV)  # model.device: auto
    (problem,) = excinfo.value.problems
    assert problem == (f"train.optimizer: '{optimizer}' pages GPU memory through bitsandbytes, but no CUDA GPU is "
                       "usable here; use adamw_torch (or auto), or adamw_8bit (8-bit states on the CPU)")


def test_the_8bit_optimizer_runs_on_a_cpu(monkeypatch):
    monkeypatch.setattr(mathtune.hardware, "cuda_available", lambda: False)
    monkeypatch.setattr(mathtune.hardware, "bitsandbytes_available", lambda: True)
    cfg = load_config(None, {"train.optimizer": "adamw_8bit", "model.device": "cpu"}, environ=NO_ENV)
    assert resolve_optimizer(cfg, "cpu") == "adamw_8bit"


def test_a_paged_optimizer_on_mps_is_refused(monkeypatch):
    monkeypatch.setattr(mathtune.hardware, "cuda_available", lambda: True)
    with pytest.raises(ConfigError, match="train.optimizer: 'paged_adamw_8bit' runs through bitsandbytes, which has "
                                          "no MPS kernels"):
        load_config(None, {"train.optimizer": "paged_adamw_8bit", "model.device": "mps"}, environ=NO_ENV)


def test_qlora_without_bitsandbytes_names_the_package_once_for_both_keys(monkeypatch):
    monkeypatch.setattr(mathtune.hardware, "cuda_available", lambda: True)
    monkeypatch.setattr(mathtune.hardware, "bitsandbytes_available", lambda: False)
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {"model.load_in_4bit": True, "train.optimizer": "paged_adamw_8bit"}, environ=NO_ENV)
    (problem,) = excinfo.value.problems
    assert problem.startswith("model.load_in_4bit and train.optimizer: needs the bitsandbytes package")
    assert problem.endswith("pip install bitsandbytes (bash scripts/setup.sh installs it)")


def test_qlora_on_this_cpu_machine_is_accepted_and_a_paged_optimizer_refused_without_patching():
    if mathtune.hardware.cuda_available():
        pytest.skip("this machine has a CUDA GPU")
    if not mathtune.hardware.bitsandbytes_available():
        pytest.skip("bitsandbytes has no wheel for this platform")
    cfg = load_config(None, {"model.load_in_4bit": True}, environ=NO_ENV)
    # the optimizer a plain run gets here (fused AdamW from torch 2.8), not a GPU's paged one
    assert cfg.model.load_in_4bit and resolve_optimizer(cfg) == resolve_optimizer(load_config(None, {}, environ=NO_ENV))
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {"model.load_in_4bit": True, "train.optimizer": "paged_adamw_8bit"}, environ=NO_ENV)
    (problem,) = excinfo.value.problems
    assert problem.startswith("train.optimizer: 'paged_adamw_8bit' pages GPU memory")


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
    monkeypatch.setattr(mathtune.hardware, "torch_version", lambda: (2, 8, 0))  # fused AdamW runs on CPUs from torch 2.4
    trainers = []
    build = mathtune.train.recipe.build_trainer
    monkeypatch.setattr(mathtune.train.recipe, "build_trainer", lambda *a, **k: trainers.append(build(*a, **k)) or trainers[-1])
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, max_steps=2, eval_steps=1)
    cfg.eval.at_end = False
    summary = train(cfg).summary
    (trainer,) = trainers
    assert trainer.args.optim == "adamw_torch_fused" and trainer.args.ddp_find_unused_parameters is False
    assert trainer.optimizer.optimizer.defaults["fused"] is True  # torch's single kernel, on the CPU too
    # The loss before training is taken by train() itself (see train.py: evaluate() first breaks DDP),
    # and it is the step-0 one, not the first periodic evaluation.
    evals = {e["step"]: e["eval_loss"] for e in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in e}
    assert trainer.args.eval_on_start is True and sorted(evals) == [0, 1, 2]
    assert summary["eval_loss_before"] == round(evals[0], 6) != round(evals[2], 6)  # step 1 ran at lr 0 (warmup)
    assert summary["processes"] == 1 and summary["engine"] is None and summary["peak_gpu_memory_gb"] is None


# ---------------------------------------------------------------------------------------------
# QLoRA on the CPU: the whole run (train, resume, eval, exports, chat), as a GPU would run it


@pytest.fixture(scope="module")
def bnb_cpu():
    pytest.importorskip("bitsandbytes")  # a dependency wherever it has a wheel (not Intel macOS)
    probe = mathtune.hardware.probe_bitsandbytes()
    if not probe["usable"]:
        pytest.skip(f"bitsandbytes cannot quantize here: {probe['error']}")


def qlora_config(tmp_path, model_dir, **train):
    cfg = tiny_run_config(tmp_path, model_dir, **train)
    cfg.model.load_in_4bit, cfg.model.device = True, "cpu"
    return cfg


def linear4bit_count(model) -> int:
    import bitsandbytes as bnb

    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


def test_qlora_on_a_cpu_is_accepted_and_refused_only_for_mps(monkeypatch):
    monkeypatch.setattr(mathtune.hardware, "cuda_available", lambda: False)
    monkeypatch.setattr(mathtune.hardware, "bitsandbytes_available", lambda: True)
    monkeypatch.setattr(mathtune.hardware, "torch_version", lambda: (2, 8, 0))
    cfg = load_config(None, {"model.load_in_4bit": True}, environ=NO_ENV)
    assert cfg.model.load_in_4bit and resolve_optimizer(cfg, "cpu") == "adamw_torch_fused"
    assert load_config(None, {"model.load_in_4bit": True, "model.device": "cpu"}, environ=NO_ENV).model.device == "cpu"
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {"model.load_in_4bit": True, "model.device": "mps"}, environ=NO_ENV)
    (problem,) = excinfo.value.problems
    assert problem.startswith("model.load_in_4bit: bitsandbytes has no 4-bit kernels for MPS")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_qlora_run_on_the_cpu_trains_resumes_and_is_scored(tmp_path, chatml_tokenizer, bnb_cpu, arch, monkeypatch):
    model_dir = save_tiny_model(arch, tmp_path / arch, chatml_tokenizer, hidden=64)
    trims = []
    monkeypatch.setattr(mathtune.hardware, "trim_heap_periodically", lambda: trims.append(1) or True)
    first = train(qlora_config(tmp_path, model_dir, max_steps=3, save_steps=3))
    assert trims == [1]  # a 4-bit CPU run hands its freed heap back (see test_memory.py)
    assert linear4bit_count(first.model) == 2 * 7  # q k v o gate up down in each of the 2 layers, in NF4
    assert first.summary["steps"] == 3 and first.summary["precision"].endswith(
        "bfloat16 weights" if mathtune.hardware.cpu_bf16_units() else "float32")
    resumed = train(qlora_config(tmp_path, model_dir, max_steps=5, save_steps=3), resume=True)
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert resumed.summary["resumed_from"].endswith("checkpoint-3") and summary["steps"] == 5
    assert summary["eval_loss_after"] is not None and summary["steps_this_session"] == 2
    scored = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    assert set(scored["models"]) == {"base", "finetuned"}  # base vs fine-tuned, both from the 4-bit base


def test_the_qlora_adapter_exports_merged_into_the_full_precision_base(tmp_path, chatml_tokenizer, bnb_cpu):
    """`--to hf` merges into the float32 base, not into its NF4 approximation, so the export differs
    from the 4-bit model it trained by the NF4 rounding of the base alone: its logits are checked
    against the 4-bit model with the adapter within 1.5x the base's own NF4 error (the adapter adds
    no error of its own), and the merged weights equal W + scale * B @ A exactly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_model("llama", tmp_path / "llama", chatml_tokenizer, hidden=64)
    cfg = qlora_config(tmp_path, model_dir, max_steps=4)
    cfg.eval.at_end = False
    result = train(cfg)
    out = export_run(tmp_path / "run", "hf").path
    merged = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    dtype = next(merged.parameters()).dtype  # the run's: bf16 where the CPU has bf16 units, else float32
    assert dtype == (torch.bfloat16 if mathtune.hardware.cpu_bf16_units() else torch.float32)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype),
                                          tmp_path / "run" / "adapter").merge_and_unload()
    for name, weight in merged.state_dict().items():
        assert torch.equal(weight, reference.state_dict()[name]), name  # merged into the full-precision weights
    merged, base = merged.float(), AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.tensor([chatml_tokenizer("What is 12*7? The answer is 84.")["input_ids"]])
    with torch.no_grad():
        trained = result.model(input_ids=ids).logits.float()
        quantized_base = result.model.get_base_model()
        with result.model.disable_adapter():
            nf4_error = (base(input_ids=ids).logits - quantized_base(input_ids=ids).logits.float()).abs().max()
        export_error = (merged(input_ids=ids).logits - trained).abs().max()
    assert 0 < nf4_error and export_error <= 1.5 * nf4_error + 1e-3


def test_an_evaluation_before_training_leaves_the_4bit_gradients_as_they_were(tmp_path, chatml_tokenizer, bnb_cpu):
    """bitsandbytes repacks 4-bit weights for an inference kernel without a backward pass the first
    time a layer runs under no_grad on an AVX512-BF16 CPU; training must not go through it."""
    from mathtune.model.load import load_model
    from mathtune.train.lora import apply_lora

    cfg = qlora_config(tmp_path, save_tiny_model("qwen2", tmp_path / "qwen2", chatml_tokenizer, hidden=64))
    ids = torch.tensor([chatml_tokenizer("12*7 = 84, and 84/7 = 12.")["input_ids"]])

    def lora_gradients(evaluate_first: bool) -> dict:
        torch.manual_seed(0)
        model = apply_lora(load_model(cfg.model)[0], cfg.lora)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
            model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, after_eval = lora_gradients(False), lora_gradients(True)
    assert plain.keys() == after_eval.keys() and all(torch.equal(plain[n], after_eval[n]) for n in plain)


def test_smollm2_in_4bit_trains_chats_and_exports_merged_into_its_gguf(tmp_path, smollm_gguf, model_cache, bnb_cpu):
    """The real model: QLoRA on the embedded SmolLM2 GGUF. `--to gguf` merges the adapter into the
    source GGUF's own tensors (not their NF4 approximation): the file matches the full-precision base
    with the adapter to f16 rounding, and differs from the 4-bit model it trained by no more than the
    base's own NF4 error (x1.5: the f16 rounding and the adapter's products on top). `--to gguf-lora`
    holds an A and a B for every adapted layer. Chat answers from the 4-bit base with the adapter."""
    import gguf

    from mathtune.chat import stream_reply
    from mathtune.model.load import load_model
    from mathtune.run import load_run_config, load_trained
    from tests.conftest import math_records, write_jsonl
    from tests.export.test_export import load_gguf, logits

    data = write_jsonl(tmp_path / "math.jsonl", math_records(12))
    cfg = load_config(overrides={
        "model.cache_dir": str(model_cache), "model.load_in_4bit": True, "model.device": "cpu",
        "data.files": [str(data)], "data.eval_fraction": 0.25, "data.max_seq_length": 128,
        "train.max_steps": 2, "train.batch_size": 2, "train.learning_rate": 1e-3, "train.logging_steps": 1,
        "eval.at_end": False, "output.dir": str(tmp_path / "run")}, environ={})
    result = train(cfg)
    run = tmp_path / "run"
    assert linear4bit_count(result.model) == 30 * 7 and result.summary["steps"] == 2

    exported = export_run(run, "gguf", quant="f16").path
    lora = export_run(run, "gguf-lora").path
    lora_tensors = [t.name for t in gguf.GGUFReader(lora).tensors]
    assert len(lora_tensors) == 2 * 30 * 7 and all(n.endswith((".lora_a", ".lora_b")) for n in lora_tensors)

    file_model, tokenizer = load_gguf(exported)
    full = cfg.model.model_copy(update={"load_in_4bit": False, "dtype": "float32"})
    reference = load_trained(run, cfg.model_copy(update={"model": full}))[0].merge_and_unload().eval()
    trained = result.model.eval()
    texts = ["¿Cuánto es 12 * 7?", "The derivative of x^3 is 3x^2."]
    from_file, expected, qlora = (logits(m, tokenizer, texts) for m in (file_model, reference, trained))
    with trained.disable_adapter():
        nf4_base = logits(trained, tokenizer, texts)
    base = logits(load_model(full)[0].eval(), tokenizer, texts)
    for got, want, q, b, b4 in zip(from_file, expected, qlora, base, nf4_base):
        assert (got - want).abs().max() < 0.05  # f16 rounding of the merged weights
        assert (got - q.float()).abs().max() <= 1.5 * (b - b4.float()).abs().max()

    reply = "".join(stream_reply(*load_trained(run, load_run_config(run)),
                                 [{"role": "user", "content": "What is 12*7?"}], max_new_tokens=4))
    assert reply.strip()


def test_a_qlora_run_on_the_cpu_stops_on_sigterm_with_a_checkpoint_and_resumes(tmp_path, chatml_tokenizer, bnb_cpu):
    """A real `mathtune train` process with a 4-bit base: SIGTERM stops it after the step with a
    checkpoint (exit status 143) and `--resume` finishes the run from there."""
    import signal

    from mathtune.cli import main
    from mathtune.train.checkpoints import last_checkpoint
    from tests.conftest import math_records, write_jsonl
    from tests.train.test_checkpoints import cli_args, start, wait_for

    if not hasattr(signal, "SIGTERM"):
        pytest.skip("no SIGTERM here")
    model_dir = save_tiny_model("llama", tmp_path / "llama", chatml_tokenizer, hidden=64)
    data = write_jsonl(tmp_path / "math.jsonl", math_records(24))
    run, log = tmp_path / "run", tmp_path / "train.log"
    steps = 60
    args = cli_args(data, model_dir, run, steps) + ["--set", "train.save_steps=1000", "--set", "model.load_in_4bit=true",
                                                    "--set", "model.device=cpu"]
    proc = start(args, log)
    metrics = run / "metrics.jsonl"
    assert wait_for(lambda: metrics.is_file() and '"loss"' in metrics.read_text(), proc), log.read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()[-3000:]
    stopped = last_checkpoint(run / "checkpoints")
    assert stopped is not None and 0 < int(stopped.name.split("-")[1]) < steps
    assert "Traceback" not in log.read_text() and not (run / "adapter").exists()
    assert main(["train", "--resume", str(run)]) == 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["resumed_from"] == str(stopped) and summary["steps"] == steps
