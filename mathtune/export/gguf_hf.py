"""A GGUF file from a Transformers folder: hyperparameters, tokenizer, chat template and merged weights.

Used by `mathtune export RUN_DIR --to gguf` when the run's base was a Transformers folder (or hub
id) rather than a GGUF file. Covers the llama, mistral (written as architecture `llama`, as
llama.cpp does) and qwen2 families, with either tokenizer they ship:

- byte-level BPE (Llama 3, Qwen2, SmolLM2): `tokenizer.ggml.model = gpt2`, tokens and merges as the
  tokenizer spells them, and the pre-tokenizer named after the split regex it uses;
- SentencePiece BPE with byte fallback (Llama 2, Mistral, Mathstral): `tokenizer.ggml.model = llama`,
  `<0xNN>` byte tokens, and scores that rank tokens in merge order (what llama.cpp merges by); the
  merges are written too, so transformers rebuilds exactly the same tokenizer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from mathtune.errors import ModelError
from mathtune.export.adapter import Adapter
from mathtune.export.gguf import (
    PERMUTED_ARCHS,
    encode,
    file_type,
    output_type,
    permute_rows,
    planned,
    tensor_names_for,
    write_gguf,
)

# Transformers model_type -> GGUF architecture
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


def gguf_arch(config: dict, where: Path) -> str:
    model_type = config.get("model_type")
    if model_type not in GGUF_ARCH:
        raise ModelError(f"{where}: writing a GGUF for model_type '{model_type}' is not supported (supported: "
                         f"{', '.join(GGUF_ARCH)}); `mathtune export RUN_DIR --to hf` writes a merged Transformers "
                         "model for any architecture")
    return GGUF_ARCH[model_type]


def read_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def heads(config: dict) -> tuple[int, int]:
    n_head = config["num_attention_heads"]
    return n_head, config.get("num_key_value_heads") or n_head


def lora_names(folder: Path, adapter: Adapter) -> tuple[str, dict[str, str]]:
    config = read_config(folder)
    arch = gguf_arch(config, folder)
    return arch, tensor_names_for(adapter, arch, config["num_hidden_layers"])


def merged_from_folder(folder: Path, tokenizer, adapter: Adapter, out: Path, quant: str) -> list[str]:
    """Write `out` from the safetensors in `folder` with the adapter merged, and `tokenizer`
    (the run's, with the chat template it trained with)."""
    import gguf
    from safetensors import safe_open

    config = read_config(folder)
    arch = gguf_arch(config, folder)
    n_blocks = config["num_hidden_layers"]
    n_head, n_head_kv = heads(config)
    writer = gguf.GGUFWriter(None, arch)
    _add_hyperparameters(writer, config, folder, quant)
    tokenizer_notes = _add_tokenizer(writer, tokenizer, folder)

    name_map = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], n_blocks)
    touched = {name: module for module, name in tensor_names_for(adapter, arch, n_blocks).items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder}: no *.safetensors weights to export")
    plan = []
    for file in files:
        with safe_open(file, framework="pt") as st:
            for key in st.keys():
                if key.endswith("rotary_emb.inv_freq") or (key == "lm_head.weight" and config.get("tie_word_embeddings")):
                    continue
                name = name_map.get_name(key, try_suffixes=(".weight", ".bias"))
                if name is None:
                    raise ModelError(f"{file}: tensor {key} has no place in a {arch} GGUF")
                shape = tuple(st.get_slice(key).get_shape())
                qtype = output_type(shape, quant)
                plan.append(planned(name, qtype, shape, _producer(file, key, name, touched.get(name), adapter, arch,
                                                                   n_head, n_head_kv, qtype)))
    write_gguf(writer, out, plan)
    return [f"{len(touched)} of {len(plan)} tensors carry the LoRA update; matrices written as {quant.upper()}, "
            "norms and biases as F32", *tokenizer_notes]


def _producer(file: Path, key: str, name: str, module: str | None, adapter: Adapter, arch: str, n_head: int,
              n_head_kv: int, qtype):
    def produce() -> np.ndarray:
        from safetensors import safe_open

        with safe_open(file, framework="pt") as st:
            weights = st.get_tensor(key).float().numpy()
        if module is not None:
            weights = weights + adapter.delta(module)
        if arch in PERMUTED_ARCHS and name.endswith(("attn_q.weight", "attn_k.weight")):
            weights = permute_rows(weights, n_head if "attn_q" in name else n_head_kv)
        return encode(weights, qtype)
    return produce


def _add_hyperparameters(writer, config: dict, folder: Path, quant: str) -> None:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ModelError(f"{folder / 'config.json'}: rope scaling '{rope.get('rope_type', rope.get('type'))}' is not "
                         "written to GGUF by mathtune; use --to hf")
    n_head, n_head_kv = heads(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer.add_name(config.get("_name_or_path") or folder.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(file_type(quant))


def _add_tokenizer(writer, tokenizer, folder: Path) -> list[str]:
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ModelError(f"{folder}: a {model.get('type')} tokenizer cannot be written to GGUF by mathtune (BPE and "
                         "SentencePiece-BPE are supported); use --to hf")
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    for text, index in vocab.items():
        tokens[index] = text
    added = tokenizer.added_tokens_decoder
    byte_fallback = bool(model.get("byte_fallback"))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    T = gguf.TokenType
    types = []
    for index, text in enumerate(tokens):
        if index in added:
            types.append(T.CONTROL if added[index].special else T.USER_DEFINED)
        elif text.startswith("[PAD") and text not in vocab:
            types.append(T.UNUSED)
        elif byte_fallback and re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            types.append(T.BYTE)
        elif index == tokenizer.unk_token_id:
            types.append(T.UNKNOWN)
        else:
            types.append(T.NORMAL)

    notes = []
    if byte_fallback:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        # llama.cpp's sentencepiece tokenizer merges the pair whose result scores highest: rank by merge order.
        rank = {m.replace(" ", ""): -float(i) for i, m in reversed(list(enumerate(merges)))}
        writer.add_token_scores([rank.get(t, 0.0) for t in tokens])
        writer.add_add_space_prefix(_adds_space_prefix(spec))
        notes.append("tokenizer: SentencePiece BPE (byte fallback)")
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec, folder))
        notes.append("tokenizer: byte-level BPE")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)

    for kind, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                           ("unk", tokenizer.unk_token_id), ("pad", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    return notes


def _adds_space_prefix(spec: dict) -> bool:
    parts = [spec.get("pre_tokenizer") or {}, spec.get("normalizer") or {}]
    for part in list(parts):
        parts.extend(part.get("pretokenizers") or part.get("normalizers") or [])
    for part in parts:
        if part.get("type") == "Metaspace":
            return part.get("prepend_scheme", "always") != "never" and part.get("add_prefix_space", True)
        if part.get("type") == "Prepend":
            return True
    return False


def _pre_tokenizer_name(spec: dict, folder: Path) -> str:
    """The llama.cpp pre-tokenizer name for this tokenizer's split regex (the ones transformers' GGUF
    loader also knows), 'gpt2' for plain byte-level splitting."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return "gpt2"
    regexes = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split" and isinstance(s.get("pattern"), dict)]
    # Several names share one regex; prefer the one llama.cpp has known longest.
    preferred = ("llama-bpe", "qwen2", "tekken", "gpt-4o")
    names = {}
    for name in (*preferred, *GGUF_PRE_TOKENIZER_SPLITS):
        names.setdefault(GGUF_PRE_TOKENIZER_SPLITS.get(name), name)
    if len(regexes) == 1 and regexes[0] in names:
        return names[regexes[0]]
    raise ModelError(f"{folder}: the tokenizer's pre-tokenizer ({json.dumps(pre)[:200]}) is not one llama.cpp knows; "
                     "use --to hf")
