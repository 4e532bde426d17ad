"""A GGUF file as a plain Transformers folder, one tensor at a time: `mathtune convert`.

    mathtune convert ~/.lmstudio/models/.../mathstral-7B-v0.1-Q4_K_M.gguf     # into mathtune's cache
    mathtune convert FILE.gguf --output ~/models/mathstral-7b                 # a folder any Transformers tool loads

transformers' `gguf_file=` loader dequantizes every tensor before anything is saved (~2 GB of RAM per
billion parameters: ~15 GB for a 7B model). This module writes the same folder in bounded memory:

- config.json, the tokenizer and the chat template come from the GGUF metadata, through transformers'
  own readers (`AutoConfig`/`AutoTokenizer` with `gguf_file=`, which read no tensor data);
- tensor names come from transformers' own GGUF name map (`get_gguf_hf_weights_map`, on a model built
  on the meta device), and each tensor goes through transformers' own tensor processor for the
  architecture (llama's Q/K row permutation undone, gemma's norms shifted back), so the folder holds
  what `from_pretrained(gguf_file=...)` would load;
- each tensor is read from the memory-mapped file, dequantized (`mathtune.model.gguf.dequantize`; large
  ones in slices of rows), cast (float32 below 1B parameters, bfloat16 from there) and written
  straight into its safetensors shard, whose header is planned from the shapes beforehand;
- the folder is written as DIR.partial and renamed when complete.

Architectures outside STREAMING_ARCHS go through transformers' loader as before, with a log line.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mathtune.errors import MathtuneError, ModelError
from mathtune.files import is_disk_full, publish
from mathtune.model.gguf import GgufHeader, GgufTensor, check_gguf_architecture, dequantize, read_header

log = logging.getLogger(__name__)

# GGUF architectures converted tensor by tensor; each is compared with transformers' own loader by
# tests/model/test_convert.py. (Mistral files are stored as `llama`.)
STREAMING_ARCHS = ("llama", "qwen2", "gemma3")
SHARD_BYTES = 2 << 30
PIECE_BYTES = 64 << 20  # float32 bytes dequantized at once: bounds the memory of a large tensor
# The process with torch, transformers and the meta model. Measured whole-conversion peaks (RssAnon)
# with SmolLM2's 49k vocabulary: 0.50 GB at 0.23B parameters, 0.48 GB at 2.3B, 0.55 GB at 7.4B.
BASE_RAM = 0.6e9
INDEX = "model.safetensors.index.json"
SOURCE = "mathtune_source.json"


@dataclass
class ConversionPlan:
    """What converting a GGUF file will take, known from its header alone."""

    gguf: Path
    arch: str
    params: int
    dtype: str
    """'float32' below 1B parameters, 'bfloat16' from there"""
    streaming: bool
    disk_bytes: int
    ram_bytes: int
    header: GgufHeader | None = field(default=None, repr=False)
    """the tensor table and where each tensor's data starts"""

    def describe(self) -> str:
        how = "tensor by tensor" if self.streaming else "with transformers' loader (whole model in memory)"
        return (f"{self.gguf.name}: {self.arch}, {self.params / 1e9:.2f}B parameters -> {self.dtype} safetensors, "
                f"{how}; needs about {self.ram_bytes / 1e9:.1f} GB of RAM and {self.disk_bytes / 1e9:.1f} GB of disk")


def plan_conversion(gguf_path: Path) -> ConversionPlan:
    """The conversion's dtype, disk and RAM, from the header alone (no tensor data is read)."""

    arch, params = check_gguf_architecture(gguf_path)
    header = read_header(gguf_path)
    metadata = header.fields
    dtype = "float32" if params < 1e9 else "bfloat16"
    itemsize = 4 if dtype == "float32" else 2
    vocab = int(metadata.get("tokenizer.ggml.tokens") or metadata.get(f"{arch}.vocab_size") or 0)
    # The tokenizer files (tokenizer.json and its config) take ~200 bytes per token on disk.
    disk = params * itemsize + 200 * vocab + (1 << 20)
    streaming = arch in STREAMING_ARCHS
    if streaming:
        largest = max(math.prod(t.shape) for t in header.tensors) * 4
        unsliced = max((math.prod(t.shape) * 4 for t in header.tensors if not _sliceable(t)), default=0)
        # A slice being dequantized holds its blocks, the float32 values and the cast copy (~3x);
        # transformers' tokenizer and config readers ~2 KB per token (the config, tokenizer and meta
        # model of DeepSeek-R1-Distill-Qwen-7B, 152k tokens, peaked at 0.72 GB).
        ram = BASE_RAM + 3 * min(largest, max(PIECE_BYTES, unsliced)) + 2000 * vocab
    else:
        ram = BASE_RAM + 4 * params  # every tensor dequantized to float32 before the cast
    return ConversionPlan(gguf_path, arch, params, dtype, streaming, int(disk), int(ram), header)


def convert(plan: ConversionPlan, out: Path, progress: bool = True) -> None:
    """Write the Transformers folder `out` (absent before; complete or absent after).

    Refuses before writing when the disk cannot hold it; a full disk during the conversion removes
    what was written and says how much space was needed."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a conversion that was killed
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < plan.disk_bytes:
        raise ModelError(f"{out.parent}: converting {plan.gguf.name} needs about {plan.disk_bytes / 1e9:.1f} GB of "
                         f"disk and {free / 1e9:.1f} GB are free. Free some space, or convert elsewhere with "
                         f"`mathtune convert {plan.gguf} --output DIR` (or set MATHTUNE_CACHE to another disk).")

    started = time.perf_counter()
    try:
        partial.mkdir()
        if plan.streaming:
            _write_streaming(plan, partial, progress)
        else:
            log.info("%s: architecture '%s' is converted with transformers' loader, which holds the whole model in "
                     "memory (streaming covers %s)", plan.gguf.name, plan.arch, ", ".join(STREAMING_ARCHS))
            _write_with_transformers(plan, partial)
        (partial / SOURCE).write_text(json.dumps(
            {"gguf": str(plan.gguf.resolve()), "size": plan.gguf.stat().st_size, "dtype": plan.dtype}, indent=2))
        partial.rename(out)  # atomic: a crash mid-write leaves DIR.partial, never a half folder at DIR
    except BaseException as exc:
        shutil.rmtree(partial, ignore_errors=True)
        if is_disk_full(exc):
            raise ModelError(f"{out.parent}: the disk filled up while converting {plan.gguf.name} (it needs about "
                             f"{plan.disk_bytes / 1e9:.1f} GB; {shutil.disk_usage(out.parent).free / 1e9:.1f} GB are "
                             "free now). Nothing was kept; free some space and try again.") from None
        raise
    log.info("Converted %s in %.1f s into %s", plan.gguf.name, time.perf_counter() - started, out)


# --- The streaming path --------------------------------------------------------------------------


def _write_streaming(plan: ConversionPlan, folder: Path, progress: bool) -> None:
    import torch
    from tqdm.auto import tqdm

    config, tokenizer, processor, names = _metadata(plan)
    dtype = getattr(torch, plan.dtype)
    config.dtype = dtype
    config.save_pretrained(folder)
    _save_generation_config(config, folder)
    tokenizer.save_pretrained(folder)
    del tokenizer

    blob = np.memmap(plan.gguf, mode="r", dtype=np.uint8)  # pages are read as each tensor is written
    tensors = [(names[t.name], t) for t in plan.header.tensors if t.name in names]
    shards = _shards(tensors, torch.finfo(dtype).bits // 8)
    weight_map, total = {}, 0
    with tqdm(total=sum(math.prod(t.shape) for _, t in tensors), unit=" weights", unit_scale=True,
              desc=f"Converting {plan.gguf.name}", dynamic_ncols=True, disable=not progress) as bar:
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            header = {name: (t.torch_shape, _st_dtype(dtype)) for name, t in shard}
            with (folder / file).open("wb") as fh:
                total += write_safetensors_header(fh, header)
                for name, tensor in shard:
                    for piece in _pieces(blob, plan.header.offsets[tensor.name], tensor, processor):
                        fh.write(_encode(piece, dtype))
                        bar.update(piece.size)
            weight_map.update({name: file for name, _ in shard})
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _metadata(plan: ConversionPlan):
    """config, tokenizer, tensor processor and GGUF -> Transformers names, from the metadata alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    folder, name = plan.gguf.parent, plan.gguf.name
    with _gguf_loaders_work_once():
        try:
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except (ValueError, OSError, KeyError, EOFError) as exc:
            raise ModelError(f"{plan.gguf}: transformers could not read this GGUF file's metadata ({exc})") from None
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        config.architectures = [type(model).__name__]
        processor = TENSOR_PROCESSORS.get(plan.arch, TensorProcessor)(config=config.to_dict())
        # The GGUF architecture, not config.model_type: gguf has no 'mistral' (such files are `llama`).
        names = get_gguf_hf_weights_map(model, processor, model_type=plan.arch)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = expected - {names[t.name] for t in plan.header.tensors if t.name in names}
    if missing:
        raise ModelError(f"{plan.gguf}: no tensor in the file for {', '.join(sorted(missing)[:5])}; "
                         "is it a complete model file (not a LoRA adapter or a projector)?")
    return config, tokenizer, processor, names


@contextmanager
def _gguf_loaders_work_once():
    """transformers' GGUF metadata readers, each doing its work once while the block runs.

    `AutoConfig` and `AutoTokenizer` each parse the whole header with `load_gguf_checkpoint`
    (gguf.GGUFReader, every vocabulary entry a numpy view): 3.4-3.8 s each for SmolLM2's 49k tokens
    on 2 cores. `get_gguf_hf_weights_map` recurses into every module and builds gguf's TensorNameMap
    for each (273 on SmolLM2: 4.7 s), the same map every time. Here the header is parsed once (each
    caller gets its own copy) and the map built once per architecture and depth: the same config,
    tokenizer and names (tests/model/test_convert.py). Both functions are looked up in their modules
    at call time (tests/test_library_internals.py). One thread at a time (a second conversion in the
    process waits): two overlapping blocks would put back each other's replacements."""
    import copy
    import functools

    import gguf
    from transformers import modeling_gguf_pytorch_utils as loader

    with _GGUF_LOADERS:
        load, name_map = loader.load_gguf_checkpoint, gguf.get_tensor_name_map
        parsed: dict[str, dict] = {}

        def load_once(path, return_tensors=False, **kwargs):
            if return_tensors or kwargs:
                return load(path, return_tensors=return_tensors, **kwargs)
            if str(path) not in parsed:
                parsed[str(path)] = load(path, return_tensors=False)
            return copy.deepcopy(parsed[str(path)])

        loader.load_gguf_checkpoint, gguf.get_tensor_name_map = load_once, functools.cache(name_map)
        try:
            yield
        finally:
            loader.load_gguf_checkpoint, gguf.get_tensor_name_map = load, name_map


_GGUF_LOADERS = threading.Lock()


def _save_generation_config(config, folder: Path) -> None:
    from transformers import GenerationConfig

    generation = GenerationConfig.from_model_config(config)
    if generation.to_diff_dict():  # save_pretrained writes one only when it says something
        generation.save_pretrained(folder)


def _shards(tensors: list, itemsize: int) -> list[list]:
    shards, current, size = [], [], 0
    for name, tensor in tensors:
        nbytes = math.prod(tensor.shape) * itemsize
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, tensor))
        size += nbytes
    return shards + [current] if current else shards


def _encode(values: np.ndarray, dtype) -> memoryview:
    """float32 values as the bytes of `dtype` (little-endian, as safetensors stores them)."""
    import torch

    if dtype == torch.float32:
        return memoryview(values).cast("B")
    if not values.flags.writeable:  # a view of the read-only file (an F32 tensor): torch wants its own
        values = values.copy()
    return torch.from_numpy(values).to(dtype).view(torch.uint8).numpy().data


def _st_dtype(dtype) -> str:
    return {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}[str(dtype)]


def _sliceable(tensor) -> bool:
    # llama's Q/K permutation reorders rows within a head, so those go whole (hidden x hidden: small).
    return len(tensor.shape) == 2 and not any(k in tensor.name for k in (".attn_q.", ".attn_k."))


def _pieces(blob: np.ndarray, start: int, tensor: GgufTensor, processor) -> Iterator[np.ndarray]:
    """A tensor's values (float32, Transformers layout) in slices of rows of about PIECE_BYTES."""
    shape = tensor.torch_shape
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    row_bytes = tensor.nbytes // rows
    step = max(1, PIECE_BYTES // (4 * shape[-1])) if _sliceable(tensor) else rows
    for first in range(0, rows, step):
        n = min(step, rows - first)
        blocks = blob[start + first * row_bytes:start + (first + n) * row_bytes].reshape(n, row_bytes)
        values = dequantize(blocks, tensor.ggml_type)
        values = values.reshape(n if len(shape) > 1 else -1, *shape[1:]) if n < rows else values.reshape(shape)
        values = processor.process(weights=values, name=tensor.name).weights
        yield np.ascontiguousarray(values, dtype=np.float32)


def write_safetensors_header(fh, tensors: dict[str, tuple[tuple[int, ...], str]]) -> int:
    """Write a safetensors header for tensors (name -> (shape, dtype)) that will follow in this order;
    returns the data bytes the file must then receive. safetensors' own writers need every tensor
    in memory at once; the format is a JSON header (8-byte length, space-padded to 8) then the data."""
    sizes = {"F32": 4, "BF16": 2, "F16": 2}
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        nbytes = math.prod(shape) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    fh.write(struct.pack("<Q", len(blob)))
    fh.write(blob)
    return offset


# --- The fallback: transformers' loader ------------------------------------------------------------


def _write_with_transformers(plan: ConversionPlan, folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = plan.gguf
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=getattr(torch, plan.dtype))
    except (ValueError, OSError, KeyError, EOFError) as exc:
        raise ModelError(f"{path}: transformers could not read this GGUF file ({exc}). "
                         "Is the file complete? A partial download is the usual cause.") from None
    # The dequantized weights are plain tensors; drop the flag that makes Trainer refuse them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# --- Checking a converted folder -------------------------------------------------------------------


def damage(folder: Path) -> str | None:
    """What is wrong with a converted folder (a missing, truncated or edited safetensors file, an
    unreadable header or index), or None when it is whole. Reads headers only."""
    files = sorted(folder.glob("*.safetensors"))
    index = folder / INDEX
    try:
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            for name in sorted(set(weight_map.values())):
                if not (folder / name).is_file():
                    return f"{name} is missing"
        elif not files:
            return "no safetensors file"
        for file in files:
            with file.open("rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            size = file.stat().st_size
            if size != 8 + length + end:
                return f"{file.name} is {size:,} bytes, its header says {8 + length + end:,}"
            if index.is_file() and any(weight_map.get(k, file.name) != file.name for k in header if k != "__metadata__"):
                return f"{file.name} holds tensors its index places elsewhere"
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        return f"unreadable ({exc.__class__.__name__}: {exc})"
    return None


def convert_to_folder(plan: ConversionPlan, output: Path, overwrite: bool = False) -> None:
    """Write the Transformers folder `output` (`mathtune convert --output`). An existing one is replaced
    only with `overwrite`, and stays whole until the new one is."""
    if not output.exists():
        convert(plan, output)
        return
    if not overwrite:
        raise MathtuneError(f"{output}: already exists; pass --overwrite to replace it, or choose another --output")
    staged = output.with_name(output.name + ".new")
    shutil.rmtree(staged, ignore_errors=True)
    convert(plan, staged)
    publish(staged, output)
