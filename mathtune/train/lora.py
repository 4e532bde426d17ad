"""Apply LoRA (or QLoRA on a 4-bit base) with PEFT, count what trains, and save the adapter.

    model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.train.gradient_checkpointing)
    save_adapter(model, tokenizer, run_dir / ADAPTER)
"""

from __future__ import annotations

import logging
import shutil
import types
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


class LoraLinearFunction(torch.autograd.Function):
    """x @ W.T + bias + scaling * (x @ A.T) @ B.T for a frozen base layer (W, bias) and LoRA's A and
    B, as one autograd node, in the dtype autocast gives linear layers where it runs (else x's).

    PEFT computes it as three linear layers and a sum: `result + B(A(x)) * scaling`. That writes and
    reads a [tokens x out_features] tensor twice more in the forward pass (the scaling, the sum) and
    again in the backward pass, and the input's gradient comes out of two layers, each written in
    full and added by autograd. Here the update is added inside the product that computes it, in
    place in the base's output (`addmm_`), and the input's gradient is one product with LoRA's part
    added inside a second. The products are PEFT's, each rounded as it rounds them, except the
    sums: rounded once instead of twice. In one bf16 step of SmolLM2-135M (1,885 tokens, Intel Xeon
    with AMX, 2 cores, torch.profiler) autograd's sums of the inputs' gradients took 113 ms and the
    copies of the base's outputs into the sums 66 ms, of 2.7 s; with this function 27 ms (the layers
    that share an input: q, k, v and gate, up) and none."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            weight, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
            down = torch.mm(flat, a.T)
            out = torch.mm(flat, weight.T) if bias is None else torch.addmm(bias.to(dtype), flat, weight.T)
            out.addmm_(down, b.T, alpha=scaling)
        needs = ctx.needs_input_grad
        ctx.save_for_backward(weight, a, b, flat if needs[3] else None, down if needs[4] else None)
        ctx.scaling, ctx.x_shape, ctx.x_dtype, ctx.lora_dtype = scaling, x.shape, x.dtype, lora_a.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, upstream):
        weight, a, b, flat, down = ctx.saved_tensors
        grad_x = grad_a = grad_b = None
        with torch.autocast(upstream.device.type, enabled=False):
            upstream = upstream.reshape(-1, upstream.shape[-1]).to(weight.dtype)
            d_down = torch.mm(upstream, b).mul_(ctx.scaling)  # d loss / d (x @ A.T)
            if ctx.needs_input_grad[0]:
                grad_x = torch.mm(upstream, weight).addmm_(d_down, a).view(ctx.x_shape).to(ctx.x_dtype)
            if ctx.needs_input_grad[3]:
                grad_a = torch.mm(d_down.T, flat).to(ctx.lora_dtype)
            if ctx.needs_input_grad[4]:
                grad_b = torch.mm(upstream.T, down).mul_(ctx.scaling).to(ctx.lora_dtype)
        return grad_x, None, None, grad_a, grad_b, None


def fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's LoRA Linear.forward, as one LoraLinearFunction where PEFT would compute plain LoRA
    over a frozen nn.Linear in one dtype (or under autocast); PEFT's own forward for the rest:
    several, disabled or merged adapters, mixed batches, dropout, DoRA, a LoRA bias, GPT-2's
    transposed Conv1D, and float32 LoRA weights beside a bf16 base outside autocast (generation)."""
    if not args and not kwargs and not self.disable_adapters and not self.merged and len(self.active_adapters) == 1:
        name = self.active_adapters[0]
        base = self.get_base_layer()
        if (name in self.lora_A and name not in self.lora_variant and not self.lora_bias.get(name, False)
                and isinstance(self.lora_dropout[name], torch.nn.Identity) and type(base) is torch.nn.Linear
                and not self.fan_in_fan_out and not base.weight.requires_grad
                and (base.bias is None or not base.bias.requires_grad)):
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            if torch.is_autocast_enabled(x.device.type) or x.dtype == base.weight.dtype == a.dtype == b.dtype:
                return LoraLinearFunction.apply(x, base.weight, base.bias, a, b, self.scaling[name])
    return type(self).forward(self, x, *args, **kwargs)


def fuse_lora_updates(model: PeftModel) -> None:
    """Every LoRA linear layer computes through `fused_lora_forward` (an instance's own `forward`;
    PEFT's class is untouched); 4-bit and 8-bit layers and embeddings are other classes and keep PEFT's."""
    from peft.tuners.lora.layer import Linear

    for module in model.modules():
        if type(module) is Linear:
            module.forward = types.MethodType(fused_lora_forward, module)


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
