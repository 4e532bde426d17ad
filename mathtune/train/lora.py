"""Apply LoRA (or QLoRA on a 4-bit base) with PEFT, count what trains, and save the adapter.

    model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.train.gradient_checkpointing)
    save_adapter(model, tokenizer, run_dir / ADAPTER)
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mathtune.errors import ConfigError, MathtuneError, ModelError
from mathtune.files import is_disk_full, publish
from mathtune.run import CHECKPOINTS
from mathtune.train.checkpoints import resume_hint

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

    from mathtune.config import LoraConfig

log = logging.getLogger("mathtune")


def apply_lora(model: PreTrainedModel, cfg: LoraConfig, gradient_checkpointing: bool = False,
               adapter: Path | None = None) -> PeftModel:
    """Freeze the base and wrap its target layers with trainable LoRA adapters: new ones (`cfg`), or
    the trained `adapter` (a folder PEFT saved: an earlier run's RUN_DIR/adapter) to train further."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    targets = find_linear_layers(model) if cfg.target_modules == "all-linear" else list(cfg.target_modules)
    present = set(find_linear_layers(model))
    missing = [t for t in targets if t not in present]
    if adapter is None and missing:
        raise ConfigError([f"lora.target_modules: {', '.join(missing)} not in this model; its linear layers are: "
                           f"{', '.join(sorted(present))}"])
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # Casts norms to fp32 and enables input grads so checkpointed 4-bit layers get gradients.
        # Non-reentrant checkpointing, as below: the reentrant kind fails under DDP.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        keep_4bit_layout_trainable(model)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if adapter is not None:
        _check_adapter_folder(adapter)
        try:
            peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
        except (RuntimeError, ValueError, KeyError) as exc:  # shapes or layer names of another model
            raise ModelError(f"model.adapter: {adapter}: does not fit this base model ({str(exc).splitlines()[0]}); "
                             "start from an adapter trained on the same model.path") from None
        cast_inputs_unless_autocast(peft_model)
        fuse_lora_updates(peft_model)
        return peft_model
    peft_config = PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        bias="none",
    )
    rng = torch.random.get_rng_state()
    peft_model = get_peft_model(model, peft_config)
    redraw_in_float32(peft_model, rng)
    cast_inputs_unless_autocast(peft_model)
    fuse_lora_updates(peft_model)
    return peft_model


class _UnlessAutocast:
    """PEFT's `cast_input_dtype_enabled` flag, true only while autocast is off on `device`."""

    def __init__(self, device: str):
        self.device = device

    def __bool__(self) -> bool:
        return not torch.is_autocast_enabled(self.device)


def cast_inputs_unless_autocast(model: PeftModel) -> None:
    """Let autocast, where it runs, choose the precision of the LoRA products.

    PEFT casts a LoRA layer's input to the LoRA weights' dtype before multiplying: under bf16
    autocast (bf16 base, float32 LoRA weights) that is a float32 copy of every layer's input,
    which autocast then casts back to bf16 for the product, and both casts again in the backward
    pass. The products and their results are the same without the round trip (bf16 -> float32 ->
    bf16 is exact); measured on SmolLM2-135M it was 8% of a training step. Outside autocast
    (generation after training, `mathtune eval`, chat) PEFT casts as before, which the float32
    LoRA weights beside a bf16 base need. tests/train/test_lora.py checks both."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            weight = next(module.parameters(), None)
            module.cast_input_dtype_enabled = _UnlessAutocast(weight.device.type if weight is not None else "cpu")


class FusedLoraUpdate:
    """Plain LoRA, its update added by the product that computes it: `addmm(result, A(x), B.T,
    alpha=scaling)` instead of PEFT's `result + B(A(x)) * scaling`, which writes and reads a
    [tokens x out_features] tensor twice more in each layer, in the forward and the backward pass
    (a scaling and an addition; on an Intel Xeon with AMX they were 10% and 5% of a SmolLM2 step).
    The same weights, merge and unmerge as plain LoRA; inside the product the addition is rounded
    once instead of twice.

    It is installed as a PEFT LoRA variant (`LoraLayer.lora_variant`, the hook DoRA uses; PEFT calls
    these five static methods) by `fuse_lora_updates`."""

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:
        return None

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight.data - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        down = module.lora_A[active_adapter](module.lora_dropout[active_adapter](x))
        up, scaling = module.lora_B[active_adapter], module.scaling[active_adapter]
        if not torch.is_autocast_enabled(x.device.type) and not result.dtype == down.dtype == up.weight.dtype:
            # A bf16 base with float32 LoRA weights outside autocast (generation after training):
            # PEFT's own sum, which its forward casts back to the base's dtype.
            return result + up(down) * scaling
        summed = torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]), up.weight.T,
                             alpha=scaling)
        return summed.view(result.shape)


def fuse_lora_updates(model: PeftModel) -> None:
    """Every plain LoRA linear layer adds its update inside the product (FusedLoraUpdate); layers
    of another kind (4-bit, embeddings), with another variant (DoRA) or a LoRA bias keep PEFT's."""
    from peft.tuners.lora.layer import Linear

    for module in model.modules():
        if type(module) is not Linear:
            continue
        for name in module.lora_A:
            if name not in module.lora_variant and not module.lora_bias.get(name, False):
                module.lora_variant[name] = FusedLoraUpdate()


def _check_adapter_folder(adapter: Path) -> None:
    if not (Path(adapter) / "adapter_config.json").is_file():
        hint = " (a run folder: its adapter is RUN_DIR/adapter)" if (Path(adapter) / "adapter").is_dir() else ""
        raise ConfigError([f"model.adapter: {adapter}: not a LoRA adapter folder (no adapter_config.json){hint}"])


def redraw_in_float32(model: PeftModel, rng: torch.Tensor, adapter: str = "default") -> None:
    """Give the LoRA matrices the float32 values the seed draws, whatever the base's dtype.

    PEFT draws each LoRA matrix in float32, moves it to the base layer's dtype and casts it back to
    float32 (`autocast_adapter_dtype`): under a bf16 base the same seed leaves bf16-rounded A
    matrices, unlike the same run on a float32 base. This replays PEFT's draws from the RNG state it
    started with, layer by layer in the order it created them (the two nn.Linear constructions, then
    `reset_lora_parameters`), into the float32 weights. tests/train/test_lora.py checks that a bf16 and a
    float32 base get the same matrices as PEFT gives the float32 one."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if any(adapter in m.lora_embedding_A for m in layers):
        return  # embedding adapters draw otherwise: PEFT's own values stand
    layers = [m for m in layers if adapter in m.lora_A]
    if all(m.get_base_layer().weight.dtype == torch.float32 for m in layers):
        return  # nothing was rounded: PEFT's own draws stand
    state = torch.random.get_rng_state()
    torch.random.set_rng_state(rng)
    with torch.no_grad():
        for layer in layers:
            a, b = layer.lora_A[adapter], layer.lora_B[adapter]
            torch.nn.Linear(a.in_features, a.out_features, bias=False)  # the draws of PEFT's constructions
            torch.nn.Linear(b.in_features, b.out_features, bias=b.bias is not None)
            layer.reset_lora_parameters(adapter, True)  # init_lora_weights=True, as apply_lora asks
    torch.random.set_rng_state(state)



def keep_4bit_layout_trainable(model: PreTrainedModel) -> None:
    """Keep bitsandbytes' 4-bit layers on the kernels that have a backward pass.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight for its inference kernel
    the first time the layer runs in eval mode without gradients (the evaluation before training)
    and keeps using that kernel once training starts; it has no backward, so the gradients reaching
    the LoRA weights of earlier layers come out wrong (torch warns "an autograd kernel was not
    registered") and a layer with a bias (qwen2's q, k, v) fails outright. Training turns the repack
    off (tests/train/test_qlora.py compares the gradients with and without an evaluation first)."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False

def lora_modules(model: PeftModel) -> list[str]:
    """The layer names LoRA was applied to (what `all-linear` resolved to), as PEFT recorded them."""
    return sorted(model.peft_config[model.active_adapter].target_modules)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; PEFT counts 4-bit packed weights at their real size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def log_lora(model) -> None:
    trainable, total = count_parameters(model)
    log.info("LoRA on %s: %s trainable of %s parameters (%.2f%%)", ", ".join(lora_modules(model)), f"{trainable:,}",
             f"{total:,}", 100 * trainable / total)


def save_adapter(model, tokenizer, target: Path, trainer=None, write: bool = True) -> None:
    """PEFT adapter + tokenizer + chat template, written aside and renamed when complete.

    With `trainer` (FSDP, ZeRO-3) every process calls this: Trainer gathers the sharded weights and
    only the process with `write` writes.
    """
    tmp = target.with_name(target.name + ".tmp")
    if write:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        if trainer is not None:
            trainer.save_model(str(tmp))
        else:
            # The trained adapter alone: GRPO and DPO keep a frozen copy of the starting one beside it ("ref").
            model.save_pretrained(tmp, selected_adapters=["default"])
        if write:
            tokenizer.save_pretrained(tmp)
    except Exception as exc:
        if write:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            kept = "the previous adapter is intact; " if target.exists() else ""
            raise MathtuneError(f"Could not save the adapter in {target}: the disk is full; {kept}the checkpoints in "
                                f"{target.parent / CHECKPOINTS} are intact. Free some space, then: "
                                f"{resume_hint(target.parent)}") from None
        raise
    if not write:
        return
    publish(tmp, target)


def find_linear_layers(model: PreTrainedModel) -> list[str]:
    """Names (last component) of every linear layer except the output head: LoRA's default targets.

    Covers nn.Linear, GPT-2's Conv1D and bitsandbytes' 4/8-bit linears, so llama, mistral, qwen2,
    gemma, falcon, opt and gpt2 work without naming modules.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if module is head:
            continue
        linear = isinstance(module, (torch.nn.Linear, Conv1D)) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")
        if linear:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)
