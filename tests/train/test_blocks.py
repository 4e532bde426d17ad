"""The lean norm and gated MLP (mathtune/train/blocks.py): the same outputs and gradients as
transformers' blocks, less kept for the backward pass, and only where they compute what llama's do."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mathtune.config import LoraConfig
from mathtune.train.blocks import RMSNormFunction, lean_blocks
from mathtune.train.lora import apply_lora
from tests.conftest import TINY_ARCHS, tiny_config


def tiny(arch: str):
    torch.manual_seed(0)
    if arch in TINY_ARCHS:
        config = tiny_config(arch, vocab_size=128)
    else:
        config = AutoConfig.for_model(arch, vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=2,
                                      eos_token_id=2, bos_token_id=1)
    return AutoModelForCausalLM.from_config(config)


# 2 layers: two norms and an MLP each, and the final norm; qwen3 adds a query and a key norm a layer.
# phi3's MLP has one fused gate_up_proj and gemma's norm scales by 1 + weight: theirs stay.
CHANGED = {"llama": 7, "mistral": 7, "qwen2": 7, "qwen3": 11, "phi3": 5, "gemma": 0, "gemma3_text": 0,
           "falcon": 0, "gpt2": 0, "opt": 0}


@pytest.mark.parametrize("arch", sorted(CHANGED))
def test_only_blocks_that_compute_what_llamas_compute_change(arch):
    model = tiny(arch)
    assert lean_blocks(model) == CHANGED[arch]
    changed = [m for m in model.modules() if "forward" in vars(m)]
    assert len(changed) == CHANGED[arch]
    assert all(type(m).__name__.endswith(("RMSNorm", "MLP")) for m in changed)


def lora_step(model, bf16: bool):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids).logits.float()
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("precision", ["float32", "bf16 autocast"])
def test_lean_blocks_give_transformers_logits_and_lora_gradients(arch, precision):
    bf16 = precision == "bf16 autocast"
    model = tiny(arch).to(torch.bfloat16 if bf16 else torch.float32)
    model = apply_lora(model, LoraConfig(r=4, alpha=8))
    for name, param in model.named_parameters():  # B starts at zero: give every LoRA factor a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    lean = copy.deepcopy(model)
    assert lean_blocks(lean) > 0

    (logits, grads), (lean_logits, lean_grads) = lora_step(model, bf16), lora_step(lean, bf16)
    assert torch.equal(lean_logits, logits)  # the forward passes are the same operations
    assert lean_grads.keys() == grads.keys()
    # The norm's input gradient is computed in float32 from the saved input instead of autograd's
    # chain of casts: one bf16 rounding apart at most.
    tolerance = {"rtol": 2e-2, "atol": 2e-3} if bf16 else {"rtol": 1e-5, "atol": 1e-7}
    for name in grads:
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(lean_grads[name], grads[name], **tolerance, msg=name)


def saved_tensors(model) -> list[torch.Tensor]:
    """What autograd keeps for the backward pass of one bf16 forward, each storage once."""
    kept = {}

    def pack(tensor):
        kept.setdefault(tensor.untyped_storage().data_ptr(), tensor)
        return tensor

    ids = torch.randint(3, 128, (1, 256))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)
    return list(kept.values())


def test_lean_blocks_keep_neither_the_norms_float32_copies_nor_silu_of_the_gate():
    model = apply_lora(tiny("llama").to(torch.bfloat16), LoraConfig(r=4, alpha=8))
    lean = copy.deepcopy(model)
    lean_blocks(lean)
    before, after = saved_tensors(model), saved_tensors(lean)
    activations = (1, 256, 32)  # [batch, tokens, hidden]
    copies = [t for t in before if t.dtype == torch.float32 and t.shape == activations]
    assert copies and not [t for t in after if t.dtype == torch.float32 and t.shape == activations]
    # Each float32 copy (4 bytes a value) is now the bf16 input (2 bytes), and SiLU(gate) of each of
    # the 2 MLPs ([1, 256, 64] in bf16) is no longer kept.
    size = lambda tensors: sum(t.untyped_storage().nbytes() for t in tensors)  # noqa: E731
    assert size(before) - size(after) == size(copies) // 2 + 2 * 256 * 64 * 2


def test_a_norm_whose_weight_trains_keeps_transformers_backward():
    model = tiny("llama")
    lean_blocks(model)
    norm = model.model.norm
    norm.weight.requires_grad_(True)
    x = torch.randn(3, 32, requires_grad=True)
    norm(x).square().sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_the_norms_input_gradient_is_the_exact_one_to_float32_rounding():
    x = torch.randn(4, 5, 48, dtype=torch.float64)
    weight = torch.rand(48, dtype=torch.float64) + 0.5
    upstream = torch.randn(4, 5, 48, dtype=torch.float64)
    exact = x.clone().requires_grad_()
    (weight * exact * torch.rsqrt(exact.pow(2).mean(-1, keepdim=True) + 1e-6)).backward(upstream)
    lean = x.float().requires_grad_()
    RMSNormFunction.apply(lean, weight.float(), 1e-6).backward(upstream.float())
    torch.testing.assert_close(lean.grad.double(), exact.grad, rtol=1e-5, atol=1e-6)
