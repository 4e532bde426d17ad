"""How much memory a planned LoRA/QLoRA run needs, from the model's shape alone.

    mathtune doctor --model ~/models/mathstral-7B-v0.1-Q4_K_M.gguf --config configs/mathstral-7b-qlora.yaml

`read_model_shape` reads a GGUF header (memory-mapped, no tensor data read), or a
config.json (with the exact parameter count from the safetensors headers when they are there); no
weights are loaded. `estimate_memory` then adds up, in bytes (b = compute-dtype bytes: 2 for
bf16/fp16, 4 for fp32; L layers, h hidden, i intermediate, kv = kv_heads x head_dim, V vocabulary,
B batch, S sequence length, P_lin the parameters of the blocks' linear layers, P_rest the others):

  weights      full precision: P x b.  4-bit NF4 with double quantization (QLoRA): P_lin x 0.516
               (4 bits + 0.127 bits of block constants) + P_rest x 4, because
               prepare_model_for_kbit_training casts embeddings, norms and the head to fp32.
  LoRA         n = r x (in + out) summed over the adapted linear layers; weights and gradients in
               fp32 (8 bytes per parameter) + AdamW state: 8 bytes (adamw_torch), 2 (8-bit optimizers).
  activations  per token and layer, what backward keeps with memory-efficient attention (SDPA,
               no S x S scores): A = b x (6h + 2kv + 4i) (norm inputs/outputs, q/k/v, attention output,
               gate/up/activation/product of the MLP). Without gradient checkpointing L x B x S x A;
               with it, the layer inputs L x B x S x h x b plus one layer recomputed, B x S x A.
  logits       B x S x V x (b + 8): the output in the compute dtype, its fp32 copy and gradient for
               the loss (an upper bound: mathtune computes the head only where there are labels).
  overhead     CUDA context and allocator slack: 0.75 GB on a GPU, 0.5 GB of process on a CPU, then
               10% on the total for fragmentation. A 4-bit run on a CPU whose heap is not trimmed adds
               50% more (x 1.6 in all): glibc's heap grows around bitsandbytes' per-layer dequantized
               copies and does not shrink back (benchmarks/qlora_cpu.py, Intel Xeon, 2 cores, batch
               1 x 512: 3.31 GB at 1.1B parameters, 12.19 GB at 7.4B). mathtune trims it where the C
               library is glibc (hardware.trim_heap_periodically), and then the x 1.1 rule holds: 2.06
               GB at 1.1B and 7.25 GB at 7.4B measured against 2.11 and 7.54 GB planned (AMD EPYC Zen 4).

Assumptions: a llama-style block (q, k, v, o, gate, up, down; GQA through kv heads), LoRA on every
linear layer of the blocks unless lora.target_modules lists some, LoRA dropout 0. For other block
layouts (GPT-2, OPT, Falcon) the same formula with their widths is an approximation.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mathtune import hardware
from mathtune.errors import ModelError
from mathtune.files import unreadable_reason
from mathtune.model.gguf import read_header

GB = 1e9
NF4_BYTES = 0.516  # 4 bits + 8-bit absmax per 64 weights + fp32 per 256 absmax (double quantization)


@dataclass
class ModelShape:
    params: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool
    source: str
    """where the numbers came from: 'GGUF header', 'config.json', 'config.json + safetensors headers'"""
    architecture: str = ""

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one block, by its llama name."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    def lora_params(self, r: int, targets: list[str] | str = "all-linear") -> int:
        shapes = self.linear_shapes()
        chosen = [n for n in shapes if targets == "all-linear" or n in targets]
        # Names of another layout (c_attn, query_key_value, fc1): count every linear layer.
        chosen = chosen or list(shapes)
        return self.layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in chosen)


def shape_from_config(config: dict[str, Any], params: int | None = None, source: str = "config.json") -> ModelShape:
    """A ModelShape from a Transformers config.json dict; parameters counted from the widths
    unless `params` (e.g. from safetensors headers) is given."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config

    def get(*names: str, default: Any = None) -> Any:
        for name in names:
            if text.get(name) is not None:
                return text[name]
        if default is None:
            raise ModelError(f"{source}: none of {', '.join(names)} found; cannot tell the model's size")
        return default

    hidden = int(get("hidden_size", "n_embd", "d_model"))
    heads = int(get("num_attention_heads", "n_head", "num_heads"))
    shape = ModelShape(
        params=0,
        layers=int(get("num_hidden_layers", "n_layer", "num_layers")),
        hidden=hidden,
        intermediate=int(get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden) or 4 * hidden),
        vocab=int(get("vocab_size")),
        heads=heads,
        kv_heads=int(get("num_key_value_heads", "num_kv_heads", default=heads)),
        head_dim=int(get("head_dim", default=hidden // heads) or hidden // heads),
        tied_embeddings=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        source=source,
        architecture=str(text.get("model_type", "")),
    )
    embeddings = shape.vocab * hidden * (1 if shape.tied_embeddings else 2)
    shape.params = params or shape.linear_params + embeddings + (2 * shape.layers + 1) * hidden
    return shape


def read_model_shape(path: Path) -> ModelShape:
    """The shape of a GGUF file, a Transformers folder or a config.json file, without loading weights."""
    path = Path(path).expanduser()
    reason = unreadable_reason(path) if path.exists() and not path.is_dir() else None
    if reason:
        raise ModelError(f"{path}: {reason}; expected a .gguf file, a Transformers folder with config.json, or a config.json")
    if path.is_file() and path.suffix != ".json":
        return _gguf_shape(path)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ModelError(f"{path}: expected a .gguf file, a Transformers folder with config.json, or a config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_file}: not a JSON config ({exc})") from None
    params = _safetensors_params(config_file.parent)
    return shape_from_config(config, params, "config.json + safetensors headers" if params else "config.json")


def _safetensors_params(folder: Path) -> int | None:
    """Exact parameter count from the headers of the folder's *.safetensors files (no tensor data read)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with file.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total


def _gguf_shape(path: Path) -> ModelShape:
    import struct


    try:
        header = read_header(path)
        metadata, tensors = header.fields, header.tensors
        arch = metadata["general.architecture"]

        def scalar(key: str, *default: int) -> int:
            return int(metadata[key] if key in metadata or not default else default[0])

        hidden = scalar(f"{arch}.embedding_length")
        heads = scalar(f"{arch}.attention.head_count")
        tokens = metadata.get("tokenizer.ggml.tokens")
        shape = ModelShape(
            params=sum(math.prod(t.shape) for t in tensors),
            layers=scalar(f"{arch}.block_count"),
            hidden=hidden,
            intermediate=scalar(f"{arch}.feed_forward_length", 4 * hidden),
            vocab=int(tokens) if tokens is not None else scalar(f"{arch}.vocab_size"),
            heads=heads,
            kv_heads=scalar(f"{arch}.attention.head_count_kv", heads),
            head_dim=scalar(f"{arch}.attention.key_length", hidden // heads),
            tied_embeddings="output.weight" not in {t.name for t in tensors},
            source="GGUF header",
            architecture=arch,
        )
    except (ValueError, KeyError, IndexError, OSError, struct.error, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: unreadable GGUF header ({exc}); is it a complete .gguf file?") from None
    return shape


@dataclass
class Plan:
    """The settings of a run that decide its memory (from the config: model, lora, data, train)."""

    device: str = "cuda"
    dtype_bytes: int = 2
    load_in_4bit: bool = False
    lora_r: int = 16
    lora_targets: list[str] | str = "all-linear"
    batch_size: int = 1
    seq_len: int = 512
    gradient_checkpointing: bool = False
    optimizer: str = "adamw_torch"

    def overrides(self, other: Plan) -> list[str]:
        """The --set KEY=VALUE arguments that turn this plan into `other`."""
        keys = {"load_in_4bit": "model.load_in_4bit", "lora_r": "lora.r", "batch_size": "train.batch_size",
                "seq_len": "data.max_seq_length", "gradient_checkpointing": "train.gradient_checkpointing",
                "optimizer": "train.optimizer"}
        out = []
        for attr, key in keys.items():
            value = getattr(other, attr)
            if value != getattr(self, attr):
                out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
        return out


CPU_4BIT_HEAP = 0.6
"""The fragmentation share of a 4-bit CPU run whose heap is not trimmed (0.1 elsewhere): see the module docstring."""


def estimate_memory(shape: ModelShape, plan: Plan) -> dict[str, float]:
    """Bytes needed by each part of a LoRA training step (see the module docstring), and the total."""
    b = plan.dtype_bytes
    if plan.load_in_4bit:
        weights = shape.linear_params * NF4_BYTES + (shape.params - shape.linear_params) * 4
    else:
        weights = shape.params * b
    n_lora = shape.lora_params(plan.lora_r, plan.lora_targets)
    optimizer_bytes = 2 if "8bit" in plan.optimizer else 8
    lora = n_lora * (8 + optimizer_bytes)
    per_token_layer = b * (6 * shape.hidden + 2 * shape.kv_heads * shape.head_dim + 4 * shape.intermediate)
    tokens = plan.batch_size * plan.seq_len
    if plan.gradient_checkpointing:
        activations = shape.layers * tokens * shape.hidden * b + tokens * per_token_layer
    else:
        activations = shape.layers * tokens * per_token_layer
    logits = tokens * shape.vocab * (b + 8)
    overhead = 0.75 * GB if plan.device == "cuda" else 0.5 * GB
    subtotal = weights + lora + activations + logits + overhead
    # mathtune trims a 4-bit CPU run's heap where the C library is glibc (hardware.trim_heap_periodically).
    heap_grows = plan.device == "cpu" and plan.load_in_4bit and hardware.heap_trimmer() is None
    slack = CPU_4BIT_HEAP if heap_grows else 0.1
    return {"weights": weights, "lora": lora, "activations": activations, "logits": logits,
            "overhead": overhead + slack * subtotal, "total": (1 + slack) * subtotal, "lora_params": n_lora}


def fit_plan(shape: ModelShape, plan: Plan, capacity: float) -> tuple[Plan, dict] | None:
    """The first plan that fits `capacity` bytes, changing one setting after another in this order:
    gradient checkpointing, 4-bit base (CUDA and CPU), paged 8-bit optimizer (CUDA), batch size 1,
    shorter sequences (down to 256), LoRA rank 8. None when nothing fits."""
    steps = [lambda p: replace(p, gradient_checkpointing=True)]
    if plan.device in ("cuda", "cpu"):
        steps.append(lambda p: replace(p, load_in_4bit=True))
    if plan.device == "cuda":
        steps.append(lambda p: replace(p, optimizer="paged_adamw_8bit"))
    steps.append(lambda p: replace(p, batch_size=1))
    seq = plan.seq_len
    while seq > 256:
        seq = max(256, seq // 2)
        steps.append(lambda p, s=seq: replace(p, seq_len=min(p.seq_len, s)))
    steps.append(lambda p: replace(p, lora_r=min(p.lora_r, 8)))
    current = plan
    for step in steps:
        current = step(current)
        estimate = estimate_memory(shape, current)
        if estimate["total"] <= capacity:
            return current, estimate
    return None
