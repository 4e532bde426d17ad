"""Model sources: what model.path may name, and the errors for what it may not."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mathtune.config import ModelConfig
from mathtune.errors import ModelError
from mathtune.hardware import resolve_device, resolve_dtype
from mathtune.model.gguf import check_gguf_architecture
from mathtune.model.load import load_model, resolve_source


@pytest.mark.parametrize(("units", "dtype"), [(None, torch.float32), ("AMX", torch.bfloat16)])
def test_transformers_folder_loads_on_cpu_in_the_auto_dtype_with_a_pad_token(tiny_llama_dir, monkeypatch, units, dtype):
    """model.dtype auto: float32 on a CPU without bf16 units, bf16 weights on one with them (either CPU, on any machine)."""
    monkeypatch.setattr("mathtune.hardware.cpu_bf16_units", lambda: units)
    model, tokenizer, source = load_model(ModelConfig(path=str(tiny_llama_dir)))
    assert source.kind == "folder" and source.load_from == str(tiny_llama_dir)
    assert next(model.parameters()).dtype == dtype and next(model.parameters()).device.type == "cpu"
    assert tokenizer.pad_token is not None and tokenizer.chat_template


def test_the_output_layer_gets_a_contiguous_input_when_generation_keeps_the_last_position(tiny_llama_dir):
    """generate() asks for the last position's logits only; without the pre-hook the output layer got
    a strided [batch, 1, hidden] view, for which torch.matmul copies the weight once per example
    (load.contiguous_output_layer_input). The logits stay the full forward's."""
    model, _, _ = load_model(ModelConfig(path=str(tiny_llama_dir), dtype="float32"))
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    ids = torch.randint(3, 100, (4, 9))
    with torch.no_grad():
        last = model(ids, logits_to_keep=1).logits
        full = model(ids).logits
    assert seen == [True, True]
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_a_file_that_is_not_gguf_is_named_with_its_magic(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ModelError, match=r"not a GGUF file \(starts with b'PK\\x03\\x04'"):
        resolve_source(ModelConfig(path=str(fake)))


def test_a_truncated_gguf_header_is_reported(tmp_path, smollm_gguf):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm_gguf.read_bytes()[:2000])
    with pytest.raises(ModelError, match="truncated"):
        check_gguf_architecture(cut)


def test_the_real_gguf_header_gives_architecture_and_size(smollm_gguf):
    arch, n_params = check_gguf_architecture(smollm_gguf)
    assert arch == "llama" and 130e6 < n_params < 140e6


def test_a_folder_without_config_json_points_at_its_gguf_files(tmp_path):
    (tmp_path / "mathstral-Q4_K_M.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="without config.json.*name one: .*mathstral-Q4_K_M.gguf"):
        resolve_source(ModelConfig(path=str(tmp_path)))


def test_a_missing_path_says_what_model_path_accepts(tmp_path):
    with pytest.raises(ModelError, match="no such file or folder.*a .gguf file, a Transformers folder or a hub id"):
        resolve_source(ModelConfig(path=str(tmp_path / "nope.gguf")))


def test_a_hub_id_offline_says_to_download_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = resolve_source(ModelConfig(path="mistralai/Mathstral-7B-v0.1"))
    assert source.kind == "hub"
    with pytest.raises(ModelError, match="could not load from the model hub.*Offline"):
        load_model(ModelConfig(path="mistralai/Mathstral-7B-v0.1"))


def test_device_and_dtype_on_a_cpu_machine(monkeypatch):
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else resolve_device("auto"))
    assert resolve_dtype("bfloat16", "cuda") == torch.bfloat16
    assert resolve_dtype("float32", "cpu") == torch.float32
    monkeypatch.setattr("mathtune.hardware.cpu_bf16_units", lambda: None)
    assert resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr("mathtune.hardware.cpu_bf16_units", lambda: "AVX512-BF16")
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    assert resolve_dtype("auto", "mps") == torch.float32


@pytest.mark.parametrize(("amx", "avx512_bf16", "units"), [(True, True, "AMX"), (False, True, "AVX512-BF16"),
                                                            (False, False, None)])
def test_cpu_bf16_units_are_read_from_torchs_own_dispatch_checks(monkeypatch, amx, avx512_bf16, units):
    from mathtune.hardware import cpu_bf16_units

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert cpu_bf16_units() == units


def test_this_cpus_bf16_units_agree_with_its_flags(request):
    """On Linux, torch's checks never claim units the kernel's CPU flags lack, and never miss
    avx512_bf16 where the flags have it (AMX also needs the kernel's permission, which torch asks)."""
    from mathtune.hardware import cpu_bf16_units

    if request.config.getoption("--cpu-bf16") != "machine":
        pytest.skip("--cpu-bf16 replaces torch's checks of this CPU")

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo")
    flags = set(next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "").split())
    units = cpu_bf16_units()
    if units == "AMX":
        assert "amx_tile" in flags
    elif units == "AVX512-BF16":
        assert "avx512_bf16" in flags
    else:
        assert "avx512_bf16" not in flags, "torch finds no bf16 units, but the CPU flags list avx512_bf16"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_loads_the_base_in_4_bit(tiny_llama_dir):
    pytest.importorskip("bitsandbytes")
    model, _, _ = load_model(ModelConfig(path=str(tiny_llama_dir), load_in_4bit=True))
    assert getattr(model, "is_loaded_in_4bit", False)


# ---------------------------------------------------------------------------------------------
# Untrusted files


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_beside_safetensors_is_never_loaded(tmp_path, tiny_llama_dir):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    torch.save({"payload": _Payload(tmp_path / "pwned")}, folder / "pytorch_model.bin")
    model, _, _ = load_model(ModelConfig(path=str(folder)))
    assert model.config.model_type == "llama"
    assert not (tmp_path / "pwned").exists()


def test_trust_remote_code_is_off_by_default_and_announced_when_on(tiny_llama_dir, caplog):
    import logging

    from mathtune.config import load_config, settings_summary

    assert ModelConfig().trust_remote_code is False
    with caplog.at_level(logging.WARNING):
        load_model(ModelConfig(path=str(tiny_llama_dir)))
    assert "trust_remote_code" not in caplog.text
    with caplog.at_level(logging.WARNING):
        load_model(ModelConfig(path=str(tiny_llama_dir), trust_remote_code=True))
    assert f"model.trust_remote_code is ON: Python code shipped with {tiny_llama_dir} will run" in caplog.text
    cfg = load_config(overrides={"model.trust_remote_code": True}, environ={})
    assert "TRUST_REMOTE_CODE=ON" in settings_summary(cfg)
    assert "TRUST_REMOTE_CODE" not in settings_summary(load_config(environ={}))


def test_mathtune_never_unpickles():
    """No pickle.load, and torch.load only with weights_only=True, anywhere in the package."""
    import re
    from pathlib import Path

    import mathtune

    offenders = []
    for path in Path(mathtune.__file__).parent.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path}: {call}")
        if re.search(r"\b(pickle|dill|joblib)\.loads?\(", text) or "trust_remote_code=True" in text:
            offenders.append(str(path))
    assert not offenders
