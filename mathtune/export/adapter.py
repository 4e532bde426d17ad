"""A trained PEFT LoRA adapter as plain arrays: for each adapted layer, A, B and the scale.

    adapter = read_adapter(run_dir / "adapter")
    adapter.delta("model.layers.0.self_attn.q_proj")   # scale * B @ A, shape (out, in)

The GGUF exports merge tensor by tensor from these arrays (a 7B model is never held whole), so they
read the adapter's safetensors directly instead of building a PEFT model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mathtune.errors import ModelError

PREFIX = "base_model.model."


@dataclass
class LoraLayer:
    a: np.ndarray
    """(r, in), float32"""
    b: np.ndarray
    """(out, r), float32"""
    scale: float
    """alpha / r, or alpha / sqrt(r) for rsLoRA"""

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class Adapter:
    alpha: float
    rslora: bool
    layers: dict[str, LoraLayer] = field(default_factory=dict)
    """Keyed by the base model's module name, e.g. 'model.layers.0.self_attn.q_proj'."""

    def delta(self, module: str) -> np.ndarray:
        layer = self.layers[module]
        return layer.scale * (layer.b @ layer.a)


def read_adapter(folder: Path) -> Adapter:
    """The LoRA factors of `folder` (adapter_config.json + adapter_model.safetensors), float32."""
    from safetensors import safe_open

    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise ModelError(f"{folder}: no LoRA adapter here (expected adapter_config.json and adapter_model.safetensors)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{config_file}: peft_type {config.get('peft_type')!r}; only LoRA adapters can be exported")
    unsupported = [key for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save") if config.get(key)]
    if unsupported:
        raise ModelError(f"{config_file}: {', '.join(unsupported)} set; GGUF export merges plain LoRA (W + scale*B@A) "
                         "only. Use `mathtune export RUN_DIR --to hf`, which merges with PEFT.")
    if config.get("fan_in_fan_out"):
        raise ModelError(f"{config_file}: fan_in_fan_out adapters (GPT-2 Conv1D layers) cannot be exported to GGUF; "
                         "use --to hf")
    alpha, rslora = float(config["lora_alpha"]), bool(config.get("use_rslora"))
    adapter = Adapter(alpha=alpha, rslora=rslora)
    with safe_open(weights_file, framework="pt") as tensors:
        keys = list(tensors.keys())
        for key in keys:
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[: -len(".lora_A.weight")].removeprefix(PREFIX)
            b_key = key.replace(".lora_A.weight", ".lora_B.weight")
            if b_key not in keys:
                raise ModelError(f"{weights_file}: {key} has no matching {b_key}")
            a = tensors.get_tensor(key).float().numpy()
            b = tensors.get_tensor(b_key).float().numpy()
            r = a.shape[0]
            adapter.layers[module] = LoraLayer(a, b, alpha / (math.sqrt(r) if rslora else r))
    if not adapter.layers:
        raise ModelError(f"{weights_file}: no LoRA weights (no *.lora_A.weight tensors)")
    return adapter
