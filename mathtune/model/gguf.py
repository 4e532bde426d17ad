"""A GGUF file's header: the one reader of it in mathtune, and what transformers can load.

    header = read_header(path)      # metadata and tensor table in milliseconds, no tensor data read
    header.fields["general.architecture"], header.parameters, header.quantization, header.missing_bytes
    check_gguf_architecture(path)   # (architecture, parameters), or a ModelError saying why not
    dequantize(blocks, ggml_type)   # a tensor's data as float32 (the conversion's and the GGUF export's)

Arrays of strings (vocabulary, merges) are skipped, not decoded, through transformers' header reader:
`gguf.GGUFReader` turns every vocabulary entry into numpy views, which took 10 s for SmolLM2's 49k
tokens on a 2-core machine (3x that for a 152k-token 7B). Writing GGUF (mathtune/export/gguf.py) and
reading tensor data (mathtune/model/convert.py) use the `gguf` package itself, and `dequantize` here.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mathtune.errors import ModelError

GGUF_MAGIC = b"GGUF"
MIN_HEADER_BYTES = 24
"""magic, version, tensor count and metadata count"""


def read_magic(path: Path) -> bytes:
    """The file's first four bytes: GGUF_MAGIC for a GGUF file."""
    with Path(path).open("rb") as fh:
        return fh.read(len(GGUF_MAGIC))


class GgufTensor(NamedTuple):
    name: str
    shape: tuple[int, ...]
    """as GGUF (and gguf.GGUFReader) lists it: innermost dimension first"""
    ggml_type: int

    @property
    def torch_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        return math.prod(self.shape) // block * size


@dataclass
class GgufHeader:
    fields: dict[str, Any]
    """The metadata; an array of strings (vocabulary, merges) as its length."""
    tensors: list[GgufTensor]
    offsets: dict[str, int]
    """Where each tensor's data starts in the file (bytes from its beginning)."""
    file_bytes: int

    @property
    def parameters(self) -> int:
        # The count mathtune.doctor.memory and check_gguf_architecture use too: every tensor's elements.
        return sum(math.prod(t.shape) for t in self.tensors)

    @property
    def data_end(self) -> int:
        return max((self.offsets[t.name] + t.nbytes for t in self.tensors), default=0)

    @property
    def missing_bytes(self) -> int:
        """Tensor data the file is too short to hold (0 for a complete file)."""
        return max(0, self.data_end - self.file_bytes)

    @property
    def quantization(self) -> str | None:
        """general.file_type's name (Q4_K_M, F16...), else the type holding most matrix elements."""
        from gguf import GGMLQuantizationType, LlamaFileType

        file_type = self.fields.get("general.file_type")
        if file_type in {t.value for t in LlamaFileType} and file_type != LlamaFileType.GUESSED:
            return LlamaFileType(file_type).name.split("_", 1)[1]
        weights: Counter = Counter()
        for tensor in self.tensors:
            if len(tensor.shape) >= 2:
                weights[tensor.ggml_type] += math.prod(tensor.shape)
        if not weights:
            return None
        qtype = weights.most_common(1)[0][0]
        return GGMLQuantizationType(qtype).name if qtype in {t.value for t in GGMLQuantizationType} else str(qtype)


def read_header(path: Path) -> GgufHeader:
    """Metadata and tensor table of a GGUF file; ValueError when it is not one or its header is cut short."""
    from transformers.integrations.gguf.reader import _mapped, _read_metadata, _read_tensor_table

    path = Path(path)
    size = path.stat().st_size
    if size < MIN_HEADER_BYTES:
        raise ValueError(f"{size} bytes: too short for a GGUF header")
    magic = read_magic(path)
    if magic != GGUF_MAGIC:
        raise ValueError(f"starts with {magic!r}, not {GGUF_MAGIC!r}")
    try:
        blob = _mapped(str(path))
        fields, count, pos = _read_metadata(blob, str(path))
        entries, pos = _read_tensor_table(blob, count, pos)
        alignment = int(fields.get("general.alignment", 32))
        data_start = (pos + alignment - 1) // alignment * alignment
        tensors = [GgufTensor(name, tuple(reversed(shape)), ggml_type) for name, shape, ggml_type, _ in entries]
        for tensor in tensors:
            tensor.nbytes  # noqa: B018 - a type the installed gguf package does not know fails here, not later
    except (struct.error, IndexError) as exc:
        raise ValueError(f"the header ends early ({exc}): a truncated file?") from None
    except KeyError as exc:
        raise ValueError(f"tensor of a type unknown to the installed gguf package ({exc})") from None
    offsets = {name: data_start + offset for name, _, _, offset in entries}
    return GgufHeader(fields, tensors, offsets, size)


def check_gguf_architecture(path: Path) -> tuple[str, int]:
    """The file's `general.architecture` and parameter count, or a ModelError listing what
    transformers can load (or saying the file is truncated). Reads the header only."""
    try:
        header = read_header(path)
        arch = header.fields["general.architecture"]
    except (ValueError, KeyError, IndexError, OSError, struct.error, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: unreadable GGUF file ({exc}); the file may be truncated (a partial download?): "
                         "download it again") from None
    if header.missing_bytes:
        raise ModelError(f"{path}: the file is truncated ({header.file_bytes:,} bytes; its tensors end at "
                         f"{header.data_end:,}): a partial download? Download it again")
    if not gguf_architecture_supported(arch):
        raise ModelError(f"{path}: GGUF architecture '{arch}' cannot be loaded by transformers; supported: "
                         f"{', '.join(gguf_supported_architectures())}")
    return arch, header.parameters


def gguf_supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]


def gguf_architecture_supported(arch: str) -> bool:
    """Whether transformers' GGUF loader reads a file of this `general.architecture`."""
    # transformers maps some names (qwen2moe -> qwen2_moe, ...); accept those by normalising '-'/'_'.
    normalized = {a.replace("_", "") for a in gguf_supported_architectures()}
    return arch.replace("_", "").replace("-", "") in normalized


_REQUIRED = object()


def gguf_field(reader, key: str, default: Any = _REQUIRED) -> Any:
    """A GGUF metadata value (str, int, float or list) from a `gguf.GGUFReader`; KeyError when it is
    missing and no default is given."""
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise KeyError(key)
        return default
    return field.contents()


def gguf_heads(reader) -> tuple[str, int | None, int | None]:
    """(architecture, attention heads, key/value heads) of a GGUF file's header; the KV count is the
    head count where the file has none (no grouped-query attention)."""
    arch = gguf_field(reader, "general.architecture")
    n_head = gguf_field(reader, f"{arch}.attention.head_count", None)
    return arch, n_head, gguf_field(reader, f"{arch}.attention.head_count_kv", n_head)


def dequantize(blocks: np.ndarray, ggml_type: int) -> np.ndarray:
    """The float32 values of GGUF data (flat or in rows: reshape them): transformers' torch kernels for
    the quantized types they know (Q4_0...Q8_0, the K-quants, the IQ types), gguf-py's numpy for the
    others (F32, F16, BF16...). The same values; on 16M elements and 2 cores of an Intel Xeon, Q4_K
    0.43 -> 0.08 s, Q6_K 0.16 -> 0.07 s, Q8_0 0.30 -> 0.04 s."""
    from transformers.integrations.gguf.dequant import GGML_BLOCK
    from transformers.integrations.gguf.dequant import dequantize as torch_dequantize

    if ggml_type in GGML_BLOCK:
        import torch

        # A copy of the quantized bytes (an eighth to a quarter of the float32 values): the file's own
        # pages are read-only, and torch wants memory it may write.
        return torch_dequantize(torch.from_numpy(np.array(blocks)).reshape(-1), ggml_type).numpy()
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as numpy_dequantize

    return numpy_dequantize(blocks, GGMLQuantizationType(ggml_type))
