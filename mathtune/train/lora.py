"""Apply LoRA (or QLoRA on a 4-bit base) with PEFT, and count what trains.

    model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.train.gradient_checkpointing)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mathtune.model.load import find_linear_layers

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

    from mathtune.config import LoraConfig


def apply_lora(model: PreTrainedModel, cfg: LoraConfig, gradient_checkpointing: bool = False) -> PeftModel:
    """Freeze the base and wrap its target layers with trainable LoRA adapters."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    from mathtune.errors import ConfigError

    targets = find_linear_layers(model) if cfg.target_modules == "all-linear" else list(cfg.target_modules)
    present = set(find_linear_layers(model))
    missing = [t for t in targets if t not in present]
    if missing:
        raise ConfigError([f"lora.target_modules: {', '.join(missing)} not in this model; its linear layers are: "
                           f"{', '.join(sorted(present))}"])
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # Casts norms to fp32 and enables input grads so checkpointed 4-bit layers get gradients.
        # Non-reentrant checkpointing, as below: the reentrant kind fails under DDP.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
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
    return get_peft_model(model, peft_config)


def lora_modules(model: PeftModel) -> list[str]:
    """The layer names LoRA was applied to (what `all-linear` resolved to), as PEFT recorded them."""
    return sorted(model.peft_config[model.active_adapter].target_modules)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; PEFT counts 4-bit packed weights at their real size."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
