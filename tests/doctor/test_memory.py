"""The memory estimator: shapes read without weights, exact parameter counts, known cases."""

from __future__ import annotations

import json

import pytest

from mathtune import hardware
from mathtune.doctor.memory import GB, Plan, estimate_memory, fit_plan, read_model_shape, shape_from_config
from mathtune.errors import ModelError

GIB = 1 << 30

# Mathstral-7B-v0.1's config.json (mistralai/Mathstral-7B-v0.1), the fields the estimator reads.
MATHSTRAL = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "vocab_size": 32768, "tie_word_embeddings": False, "max_position_embeddings": 32768,
}
QLORA_1024 = Plan(device="cuda", dtype_bytes=2, load_in_4bit=True, lora_r=16, batch_size=1, seq_len=1024,
                  gradient_checkpointing=True, optimizer="paged_adamw_8bit")


def test_mathstral_7b_parameters_from_its_config():
    shape = shape_from_config(MATHSTRAL)
    assert shape.params == 7_248_023_552  # 7.25B, the published size
    assert shape.lora_params(16) == 41_943_040  # r=16 on q, k, v, o, gate, up, down of 32 layers


def test_mathstral_7b_qlora_fits_a_12_gb_gpu_at_1024_tokens_with_checkpointing(tmp_path):
    folder = tmp_path / "mathstral"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MATHSTRAL))
    shape = read_model_shape(folder)
    estimate = estimate_memory(shape, QLORA_1024)
    # weights: 6.98B linear x 0.516 + 0.27B fp32 (embeddings, head, norms) = 4.68 GB
    assert estimate["weights"] / GB == pytest.approx(4.68, abs=0.01)
    assert estimate["total"] / GB == pytest.approx(7.28, abs=0.05)
    assert estimate["total"] < 12 * GIB
    # Without checkpointing the 32 layers' activations (5.5 GB) take it to 12.85 GB: more than the
    # ~11.5 GiB a 12 GB card leaves free once the driver and a display have their share.
    no_checkpointing = estimate_memory(shape, Plan(**{**QLORA_1024.__dict__, "gradient_checkpointing": False}))
    assert no_checkpointing["activations"] / GB == pytest.approx(5.50, abs=0.01)
    assert no_checkpointing["total"] / GB == pytest.approx(12.85, abs=0.05)


def test_full_precision_7b_needs_far_more_and_fit_plan_finds_the_settings():
    shape = shape_from_config(MATHSTRAL)
    bf16 = Plan(device="cuda", dtype_bytes=2, batch_size=4, seq_len=1024)
    assert estimate_memory(shape, bf16)["weights"] == 2 * shape.params
    fixed, estimate = fit_plan(shape, bf16, 12 * GIB)
    assert estimate["total"] <= 12 * GIB
    assert bf16.overrides(fixed) == ["model.load_in_4bit=true", "train.gradient_checkpointing=true"]
    assert fit_plan(shape, bf16, 2 * GIB) is None
    # On a CPU there is no 4-bit: only checkpointing, batch, length and rank can change.
    cpu = Plan(device="cpu", dtype_bytes=4, batch_size=8, seq_len=512)
    fixed, _ = fit_plan(shape, cpu, 40 * GIB)
    assert not fixed.load_in_4bit and fixed.gradient_checkpointing


def test_lora_target_subset_counts_only_those_layers():
    shape = shape_from_config(MATHSTRAL)
    assert shape.lora_params(8, ["q_proj", "v_proj"]) == 32 * 8 * ((4096 + 4096) + (4096 + 1024))


def test_counts_match_a_real_model_and_peft(tiny_llama_dir):
    """Parameters from config.json alone, and from the safetensors headers, equal the loaded model's;
    the LoRA count equals PEFT's trainable parameters."""
    from transformers import AutoModelForCausalLM

    from mathtune.config import LoraConfig
    from mathtune.train.lora import apply_lora, count_parameters

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    shape = read_model_shape(tiny_llama_dir)
    assert shape.source == "config.json + safetensors headers"
    assert shape.params == model.num_parameters()
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert shape_from_config(config).params == model.num_parameters()
    trainable, _ = count_parameters(apply_lora(model, LoraConfig(r=4)))
    assert shape.lora_params(4) == trainable


def test_a_gguf_header_gives_the_shape_without_loading_weights(smollm_gguf):
    shape = read_model_shape(smollm_gguf)
    assert (shape.layers, shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.vocab) == (
        30, 576, 1536, 9, 3, 49152)
    assert shape.tied_embeddings and shape.source == "GGUF header" and shape.architecture == "llama"
    assert shape.params == 134_515_008  # SmolLM2-135M


def test_unreadable_model_paths_are_explained(tmp_path):
    with pytest.raises(ModelError, match="expected a .gguf file, a Transformers folder"):
        read_model_shape(tmp_path / "missing")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 20)
    with pytest.raises(ModelError, match="unreadable GGUF header"):
        read_model_shape(bad)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "x"}))
    with pytest.raises(ModelError, match="none of hidden_size, n_embd, d_model found"):
        read_model_shape(tmp_path)


SHAPES_1B_7B = {"1b": (16, 2048, 8192, 8, True), "7b": (32, 4096, 14336, 8, False)}


def _4bit_cpu_estimate(shape: str) -> tuple[float, float]:
    layers, hidden, ffn, kv_heads, tied = SHAPES_1B_7B[shape]
    config = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
              "num_attention_heads": 32, "num_key_value_heads": kv_heads, "vocab_size": 49152,
              "tie_word_embeddings": tied}
    plan = Plan(device="cpu", dtype_bytes=2, load_in_4bit=True, batch_size=1, seq_len=512, gradient_checkpointing=True)
    gpu = estimate_memory(shape_from_config(config), Plan(**{**plan.__dict__, "device": "cuda"}))["total"]
    return estimate_memory(shape_from_config(config), plan)["total"], gpu


@pytest.mark.parametrize("shape, measured", [("1b", 2.06e9), ("7b", 7.25e9)])
def test_a_4bit_cpu_plan_is_within_15_percent_of_the_measured_peak(shape, measured):
    """benchmarks/qlora_cpu.py on an AMD EPYC (Zen 4, AVX512-BF16), 2 cores, batch 1 x 512, gradient
    checkpointing, bf16 compute, SmolLM2's 49,152-token vocabulary: the peak anonymous memory of
    `mathtune train`, which trims its heap (glibc)."""
    if hardware.heap_trimmer() is None:
        pytest.skip("the C library is not glibc: mathtune cannot trim the heap here")
    estimate, _ = _4bit_cpu_estimate(shape)
    assert abs(estimate - measured) / measured < 0.15


@pytest.mark.parametrize("shape, measured", [("1b", 3.31e9), ("7b", 12.19e9)])
def test_without_heap_trimming_a_4bit_cpu_plan_counts_the_heaps_growth(shape, measured, monkeypatch):
    """The same runs before mathtune trimmed the heap (Intel Xeon, AMX, 2 cores): what a C library
    other than glibc is planned for."""
    monkeypatch.setattr(hardware, "heap_trimmer", lambda: None)
    estimate, gpu = _4bit_cpu_estimate(shape)
    assert abs(estimate - measured) / measured < 0.15
    assert estimate > 1.2 * gpu  # the CPU heap's growth, which a GPU's allocator does not have


def test_the_heap_trimmer_hands_freed_memory_back(monkeypatch):
    trim = hardware.heap_trimmer()
    if trim is None:
        pytest.skip("the C library is not glibc")
    import ctypes

    def rss_anon() -> int:
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
        return int(status["RssAnon"].split()[0]) * 1024

    # 200 MB in blocks small enough for the heap (not mmap), all freed but the last one, which pins
    # the heap's top: without a trim the freed pages stay with the process.
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(3200)]
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)
    for block in blocks[:-1]:
        libc.free(block)
    before = rss_anon()
    trim(0)
    assert before - rss_anon() > 100e6
    libc.free(blocks[-1])

    monkeypatch.setattr(hardware, "_trimming", False)
    assert hardware.trim_heap_periodically(period=60) is True
    assert hardware.trim_heap_periodically(period=60) is False  # one thread per process
    import threading

    assert any(t.name == "mathtune-heap-trim" and t.daemon for t in threading.enumerate())


def test_freed_memory_is_handed_back_at_once_where_the_c_library_is_glibc(monkeypatch):
    calls = []
    monkeypatch.setattr(hardware, "heap_trimmer", lambda: lambda pad: calls.append(pad))
    assert hardware.release_freed_memory() is True and calls == [0]
    monkeypatch.setattr(hardware, "heap_trimmer", lambda: None)
    assert hardware.release_freed_memory() is False
