"""Shared fixtures: a tiny ChatML tokenizer, tiny models of each architecture, the real SmolLM2 GGUF.

Tiny models are built from configs (2 layers, hidden 32) and saved as Transformers folders, so the
tests run the real loading path in seconds. The tokenizer is a byte-level BPE trained on a few
sentences, with pad == eos == <|im_end|> like SmolLM2, so label masking is tested on that trap.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is 12 * 7? 12 * 7 = 84. The answer is \\boxed{84}.",
    "¿Cuánto es 3/4 + 1/8? Sumamos: 6/8 + 1/8 = 7/8. La respuesta es \\boxed{\\frac{7}{8}}.",
    "Solve 2x + 3 = 11. Subtract 3, divide by 2: x = 4.",
    "Calcula la derivada de 3x^2: 6x. You are a helpful math tutor. Eres un tutor de matemáticas.",
    "system user assistant 0123456789 + - * / = ( ) { } \\frac \\boxed % $",
]

TINY_ARCHS = ("llama", "mistral", "qwen2", "falcon", "opt", "gpt2")


def pytest_addoption(parser):
    parser.addoption(
        "--cpu-bf16", choices=("machine", "none"), default="machine",
        help="'none': the tests see a CPU without bf16 units (torch's AMX and AVX512-BF16 checks answer False), "
             "so a machine with them also checks the float32 path of model.dtype auto. Tests that start "
             "processes of their own (the CLI, torchrun) still see the machine's units.")


@pytest.fixture(autouse=True)
def _cpu_bf16_units(request, monkeypatch):
    if request.config.getoption("--cpu-bf16") == "none":
        import torch

        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)


@pytest.fixture(autouse=True, scope="session")
def _offline_and_quiet():
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"


@pytest.fixture(autouse=True)
def _no_user_env(monkeypatch):
    # A developer's own MATHTUNE_* settings must not leak into the tests.
    for name in list(os.environ):
        if name.startswith("MATHTUNE_") and name != "MATHTUNE_CACHE":
            monkeypatch.delenv(name)


def build_chatml_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def chatml_tokenizer():
    return build_chatml_tokenizer()


def tiny_config(arch: str, vocab_size: int, hidden: int = 32):
    """2 layers of width `hidden` (32; 64 for 4-bit models: bitsandbytes' CPU kernels quantize rows in
    blocks of 64)."""
    import transformers as tf

    common = {"vocab_size": vocab_size, "eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 2}
    if arch in ("llama", "mistral", "qwen2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[arch]
        return cls(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512, **common)
    if arch == "falcon":
        return tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=32, max_position_embeddings=512, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512, **common)
    raise ValueError(arch)


def save_tiny_model(arch: str, folder: Path, tokenizer, seed: int = 0, hidden: int = 32) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), hidden))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, chatml_tokenizer) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"), chatml_tokenizer)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One conversion cache for the whole session (the SmolLM2 conversion takes ~20 s)."""
    return tmp_path_factory.mktemp("mathtune-cache")


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    from mathtune.model.load import embedded_model_path

    return embedded_model_path()


@pytest.fixture(scope="session")
def smol_run(tmp_path_factory, smollm_gguf, model_cache) -> Path:
    """A real SmolLM2-135M-Instruct run: its embedded Q4_1 GGUF, 2 LoRA steps in float32
    (tests/export/test_export.py's train_run), shared by the export and llama.cpp tests."""
    from tests.export.test_export import train_run

    return train_run(tmp_path_factory.mktemp("smol"), smollm_gguf, model_cache, steps=2)


def write_jsonl(path: Path, records) -> Path:
    import json

    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def math_records(n: int = 24) -> list[dict]:
    """Small pair records with answers, for end-to-end runs on tiny models."""
    return [
        {"instruction": f"What is {a} + {a + 3}?", "output": f"{a} + {a + 3} = {2 * a + 3}. \\boxed{{{2 * a + 3}}}"}
        for a in range(1, n + 1)
    ]
