"""GGUF out, with llama.cpp's own `gguf` package: a merged model, or a llama.cpp LoRA adapter.

    mathtune export runs/x --to gguf [--quant f16|bf16|q8_0] [--requant-all]
    mathtune export runs/x --to gguf-lora

When the base came from a GGUF file (an LM Studio download), the merged file is that file with each
tensor LoRA touched replaced by W + scale * B @ A: every metadata field (tokenizer, chat template,
hyperparameters, alignment) is copied as it was, untouched tensors keep their bytes (a Q4_K stays a
Q4_K), and touched ones are written in the requested type, because `gguf` cannot write K-quants.
A base that came from a Transformers folder is written from its safetensors (see gguf_hf.py).

Everything goes tensor by tensor: the header is written from a plan of every tensor's type and
size, then each tensor is computed, written and dropped, so a 7B export holds one tensor at a time.
Layouts to respect: GGUF lists shapes innermost-first (numpy's order reversed), and architecture
`llama` stores the Q and K projections with their rows permuted for llama.cpp's rotary layout, so a
delta for them is permuted the same way (transformers undoes it on load).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from mathtune.errors import MathtuneError, ModelError
from mathtune.export.adapter import Adapter
from mathtune.files import is_disk_full, no_space, require_space
from mathtune.model.gguf import dequantize, gguf_field, gguf_heads

# Architectures whose GGUF tensors map one to one onto the Transformers modules LoRA adapts, each
# round-tripped by a test. Others (gpt2's transposed Conv1D, bloom's fused QKV...) need more.
MERGE_ARCHS = ("llama", "qwen2", "gemma3")
PERMUTED_ARCHS = ("llama",)

QUANTS = ("f16", "bf16", "q8_0")


def quant_type(name: str):
    from gguf import GGMLQuantizationType as T

    return {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}[name]


def file_type(name: str) -> int:
    from gguf import LlamaFileType as F

    return {"f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[name]


def permute_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K layout: within each head, interleaved rotary halves -> split halves."""
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


@dataclass
class PlannedTensor:
    name: str
    qtype: object
    """a gguf.GGMLQuantizationType"""
    shape: tuple[int, ...]
    """numpy order, elements (not bytes)"""
    produce: Callable[[], np.ndarray]
    """computes the tensor's data, already in `qtype`, when its turn to be written comes"""


def planned_nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * shape[-1] // block * size


def output_type(shape: tuple[int, ...], quant: str):
    """The type a float tensor is written in: 1-D tensors (norms, biases) stay F32 as in llama.cpp's
    converter; a row that does not split into whole quantization blocks falls back to F16."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2:
        return T.F32
    qtype = quant_type(quant)
    return qtype if shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0 else T.F16


def encode(values: np.ndarray, qtype) -> np.ndarray:
    from gguf import quants

    return quants.quantize(np.ascontiguousarray(values, dtype=np.float32), qtype)


HEADER_ALLOWANCE = 64 << 20
"""Room counted for the metadata (a 150,000-token vocabulary and its merges take ~10 MB)."""


def write_gguf(writer, out: Path, tensors: list[PlannedTensor]) -> None:
    """Header, metadata and tensor table from the plan, then each tensor in turn; written aside and
    renamed when complete, so `out` is either absent or whole. A disk without room for it is found
    before the first byte, or when it fills up during the write (the partial file is removed)."""
    tmp = out.with_name(out.name + ".partial")
    total = 0
    for t in tensors:
        nbytes = planned_nbytes(t.shape, t.qtype)
        writer.add_tensor_info(t.name, t.shape, np.float32, nbytes, raw_dtype=t.qtype)
        total += nbytes
    require_space(out, total + HEADER_ALLOWANCE)
    disk_full = False
    try:
        _write_all(writer, tmp, out, tensors, total)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        disk_full = True
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    if disk_full:
        raise MathtuneError(no_space(out, total + HEADER_ALLOWANCE, during=True))


def _write_all(writer, tmp: Path, out: Path, tensors: list[PlannedTensor], total: int) -> None:
    from tqdm.auto import tqdm

    writer.write_header_to_file(tmp)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"Writing {out.name}", dynamic_ncols=True) as bar:
        for t in tensors:
            data = t.produce()
            writer.write_tensor_data(data)
            bar.update(data.nbytes)
    writer.close()
    os.replace(tmp, out)


def planned(name: str, qtype, shape: tuple[int, ...], produce: Callable[[], np.ndarray]) -> PlannedTensor:
    # add_tensor_info takes the element shape when given a float dtype and a raw type.
    return PlannedTensor(name, qtype, tuple(int(s) for s in shape), produce)


def tensor_names_for(adapter: Adapter, arch: str, n_blocks: int, available: set[str] | None = None) -> dict[str, str]:
    """GGUF tensor name of each adapted module, e.g. 'model.layers.0.self_attn.q_proj' -> 'blk.0.attn_q.weight'."""
    import gguf

    arch_ids = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}
    name_map = gguf.get_tensor_name_map(arch_ids[arch], n_blocks)
    names = {}
    for module in adapter.layers:
        name = name_map.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None or (available is not None and name not in available):
            raise ModelError(f"LoRA layer {module}: no matching tensor in the {arch} GGUF layout"
                             f"{f' (looked for {name})' if name else ''}")
        names[module] = name
    return names


def mergeable_arch(reader, source: Path) -> str:
    arch = gguf_field(reader, "general.architecture", None)
    if arch not in MERGE_ARCHS:
        raise ModelError(f"{source}: merging into a GGUF of architecture '{arch}' is not supported (supported: "
                         f"{', '.join(MERGE_ARCHS)}); `--to hf` writes a merged Transformers model, and `--to gguf-lora` "
                         "an adapter for llama.cpp")
    return arch


def merged_from_gguf(source: Path, adapter: Adapter, out: Path, quant: str, requant_all: bool = False,
                     chat_template: str | None = None) -> list[str]:
    """Write `out`: the GGUF `source` with the adapter merged. Returns notes for the user.

    `chat_template` (the one the run trained with) is added only when the source has none: a base
    model's file often has none, and the fine-tune answers in the format it was trained on."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = mergeable_arch(reader, source)
    names = tensor_names_for(adapter, arch, int(gguf_field(reader, f"{arch}.block_count")),
                             {t.name for t in reader.tensors})
    touched = {gguf_name: module for module, gguf_name in names.items()}
    _, n_head, n_head_kv = gguf_heads(reader)

    writer = gguf.GGUFWriter(None, arch)
    added_template = copy_metadata(reader, writer, quant, requant_all, chat_template)
    plan, fallbacks, kquants = merge_plan(reader, adapter, touched, arch, (n_head, n_head_kv), quant, requant_all)
    write_gguf(writer, out, plan)

    notes = [f"{len(touched)} of {len(reader.tensors)} tensors carry the LoRA update and were written as {quant.upper()}"
             + ("; the rest keep the source's types" if not requant_all else "; all other matrices were converted too")]
    if added_template:
        notes.append("the source has no chat template; the one this run trained with was added")
    if kquants:
        notes.append(f"the source's {'/'.join(sorted(kquants))} tensors that LoRA touched could not be rewritten as "
                     f"K-quants (the gguf package cannot write them): they are {quant.upper()} now")
    if fallbacks:
        notes.append(f"{len(fallbacks)} tensors have rows that do not split into {quant.upper()} blocks and were written "
                     "as F16")
    return notes


def copy_metadata(reader, writer, quant: str, requant_all: bool, chat_template: str | None) -> bool:
    """Every metadata field of the source into `writer`, as it was, and its alignment; the file type
    becomes `quant`'s when every matrix is re-encoded. `chat_template` is added when the source has
    none; returns whether it was."""
    import gguf

    writer.data_alignment = reader.alignment
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue  # the writer writes these itself
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE and requant_all:
            value = file_type(quant)
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    added = chat_template is not None and reader.get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE) is None
    if added:
        writer.add_chat_template(chat_template)
    return added


def merge_plan(reader, adapter: Adapter, touched: dict[str, str], arch: str, heads: tuple[int, int], quant: str,
               requant_all: bool) -> tuple[list[PlannedTensor], list[str], set[str]]:
    """The merged file's tensors, in the source's order: each one LoRA touched (`touched` maps its GGUF
    name to the adapter's module), and with `requant_all` every other matrix, is re-encoded in
    `quant`; the rest keep their bytes. Also the tensors written F16 because their rows do not split
    into `quant` blocks, and the K-quant types that were re-encoded."""
    plan, fallbacks, kquants = [], [], set()
    for tensor in reader.tensors:
        shape = numpy_shape(tensor)
        if not (tensor.name in touched or (requant_all and len(shape) >= 2)):
            plan.append(planned(tensor.name, tensor.tensor_type, shape, lambda t=tensor: t.data))
            continue
        qtype = output_type(shape, quant)
        if qtype != quant_type(quant) and len(shape) >= 2:
            fallbacks.append(tensor.name)
        if tensor.tensor_type.name.endswith("_K"):
            kquants.add(tensor.tensor_type.name)
        module = touched.get(tensor.name)
        delta = partial(lora_delta, adapter, module, tensor.name, arch, heads) if module else None
        plan.append(planned(tensor.name, qtype, shape, reencoded(tensor, qtype, delta)))
    return plan, fallbacks, kquants


def lora_delta(adapter: Adapter, module: str, name: str, arch: str, heads: tuple[int, int]) -> np.ndarray:
    """The adapter's update of `module`, in the row order of its GGUF tensor `name` (the Q and K rows
    of a permuted architecture are permuted with `heads`, the query and the key-value head counts)."""
    delta = adapter.delta(module)
    if arch in PERMUTED_ARCHS and name.endswith(("attn_q.weight", "attn_k.weight")):
        delta = permute_rows(delta, heads[0] if "attn_q" in name else heads[1])
    return delta


def reencoded(tensor, qtype, delta: Callable[[], np.ndarray] | None) -> Callable[[], np.ndarray]:
    """What computes `tensor`'s new data when its turn comes: its weights, plus `delta()` when LoRA
    touched it, encoded as `qtype`."""
    def produce() -> np.ndarray:
        weights = dequantize(tensor.data, int(tensor.tensor_type)).reshape(numpy_shape(tensor))
        return encode(weights if delta is None else weights + delta(), qtype)
    return produce


def numpy_shape(tensor) -> tuple[int, ...]:
    """A GGUF tensor's element shape in numpy order (GGUF lists the innermost dimension first)."""
    return tuple(int(d) for d in reversed(tensor.shape))


def lora_gguf(adapter: Adapter, arch: str, names: dict[str, str], n_head: int, n_head_kv: int, out: Path,
              base_name: str) -> list[str]:
    """Write the adapter as a llama.cpp LoRA GGUF (`llama-cli -m base.gguf --lora out`).

    llama.cpp scales each layer by adapter.lora.alpha / rank, so rsLoRA's alpha / sqrt(rank) is
    expressed as alpha' = alpha * sqrt(rank). The factors are stored in F32 (they are small)."""
    import gguf

    scales = {layer.scale * layer.rank for layer in adapter.layers.values()}
    if len(scales) != 1:
        raise ModelError("the adapter's layers have different ranks or alphas; llama.cpp LoRA GGUFs take one alpha")
    writer = gguf.GGUFWriter(None, arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(scales.pop()))
    writer.add_name(f"{base_name} LoRA (mathtune)")

    plan = []
    for module, layer in adapter.layers.items():
        name = names[module]
        b = layer.b
        if arch in PERMUTED_ARCHS and name.endswith(("attn_q.weight", "attn_k.weight")):
            b = permute_rows(b, n_head if "attn_q" in name else n_head_kv)
        f32 = gguf.GGMLQuantizationType.F32
        plan.append(planned(f"{name}.lora_a", f32, layer.a.shape, lambda a=layer.a: np.ascontiguousarray(a, np.float32)))
        plan.append(planned(f"{name}.lora_b", f32, b.shape, lambda b=b: np.ascontiguousarray(b, np.float32)))
    write_gguf(writer, out, plan)
    rank = next(iter(adapter.layers.values())).rank
    return [f"{len(adapter.layers)} LoRA layers, rank {rank}, F32"]
