"""Blocks of a training step with leaner backward passes: the RMSNorm and the SiLU-gated MLP of
llama-family models (they keep less), and per-example attention on a CPU in bf16 (its backward in
float32).

    lean_blocks(model)   # as train.build_trainer does, before training; returns how many it changed
    FlashAttentionFloat32Backward.apply(q, k, v, scale, multiple)   # as packing.causal_sdpa does on a CPU in bf16

A LoRA step keeps, for its backward pass, what autograd saved in the forward pass: on SmolLM2-135M
in bf16 about 0.9 MB a token, most of the step's memory. Two of the blocks save more than their
gradients need, and are slower for it:

- transformers' RMSNorm (`weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)`) keeps a
  float32 copy of its input, twice the bf16 input's size. `RMSNormFunction` keeps the input as it
  came and the reciprocal RMS, one float a row, and recomputes the normalised rows in its backward
  pass. Same output bit for bit; the input's gradient within one bf16 step.
- `act_fn(gate) * up` keeps the gate, SiLU(gate) and up. `SiluGateFunction` keeps gate and up
  and computes SiLU(gate) again in its backward pass. Same output and gradients bit for bit.

Measured on an Intel Xeon with AMX, 2 cores, 1,100 tokens of SmolLM2's width, forward and
backward: the norm 3.5 -> 1.8 ms in bf16 and 1.9 -> 1.5 ms in float32; the gated product 3.4 ->
4.1 ms in bf16 and 3.8 -> 4.4 ms in float32 (the recomputed SiLU); 1.3 MB less kept by each norm
and 3.4 MB by each MLP in bf16. The default run's steps peaked at 1.80 GB of heap in use instead
of 2.01 GB (glibc's mallinfo2).
"""

from __future__ import annotations

import types

import torch
from torch.nn import functional as F  # noqa: N812


class RMSNormFunction(torch.autograd.Function):
    """y = weight * (x * rstd).to(x.dtype), rstd = 1 / sqrt(mean(x^2) + eps) in float32, over the
    last dimension; `weight` is frozen (it gets no gradient)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        normed = x.to(torch.float32, copy=True)  # a copy even in float32: it is scaled in place
        rstd = torch.rsqrt(normed.pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return weight * normed.mul_(rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32, copy=True).mul_(rstd)
        grad = (upstream * weight).float()  # d loss / d normed, rounded as autograd rounds it
        # d normed_j / d x_i = rstd * (delta_ij - normed_i * normed_j / n)
        dot = (grad * normed).mean(-1, keepdim=True)
        return grad.sub_(normed.mul_(dot)).mul_(rstd).to(x.dtype), None, None


class SiluGateFunction(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up for the backward pass (not silu(gate) as well)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        gate, up = ctx.saved_tensors
        d_gate = torch.ops.aten.silu_backward(upstream * up, gate) if ctx.needs_input_grad[0] else None
        d_up = upstream * F.silu(gate) if ctx.needs_input_grad[1] else None
        return d_gate, d_up


class FlashAttentionFloat32Backward(torch.autograd.Function):
    """Causal attention by PyTorch's CPU flash kernel (no dropout): the forward pass in the inputs'
    dtype, the backward pass in float32 from the same saved tensors (inputs, output, log-sum-exp).
    Key and value may have fewer heads than the query (grouped-query attention): the kernel takes
    them as they are, and their gradients come back with their own number of heads.

    The bf16 kernel's backward pass is slower than the float32 one (packing.half_cpu_flash has the
    figures for each kind of bf16 units): for 8 examples of 96-288 tokens of SmolLM2's attention (9
    heads of 64), forward and backward took 22.1 ms in bf16, 20.6 ms all in float32 (its forward is
    slower: 5.4 against 2.3 ms), and 19.0 ms this way (Intel Xeon with AMX, 2 cores). The gradients
    are closer to float64's: for q, k, v at most 1.0e-2, 9.8e-3, 1.3e-2 off, against 1.0e-2, 1.9e-2,
    3.0e-2 in bf16. It keeps what the bf16 kernel keeps.

    With `multiple`, the forward pass runs on the example padded at the end to a multiple of it
    (packing.LENGTH_MULTIPLE: the bf16 kernel on AMX keeps compiled kernels per length) and the
    backward pass on its real rows alone. The padded keys come after every real query, so causality
    hides them: the real rows' output, log-sum-exp and gradients are the unpadded example's, and the
    padding's share of the work is not done twice. 16 examples of 96-300 tokens: the float32
    backward pass 33.2 ms on their real rows, 37.0 ms padded to 32 (the same Xeon)."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None,
                multiple: int = 1):
        length = query.shape[2]
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *pad_tokens((query, key, value), multiple), 0.0, True, scale=scale)
        if out.shape[2] != length:
            out, logsumexp = out[:, :, :length], logsumexp[:, :, :length].contiguous()
        ctx.save_for_backward(query, key, value, out, logsumexp)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        query, key, value, out, logsumexp = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            upstream.float(), query.float(), key.float(), value.float(), out.float(), logsumexp, 0.0, True,
            scale=ctx.scale)
        return *(g.to(t.dtype) for g, t in zip(grads, (query, key, value))), None, None


def pad_tokens(tensors, multiple: int) -> list[torch.Tensor]:
    """Attention inputs (batch, heads, length, dim) padded with zeros at the end of their length to a
    multiple of `multiple`."""
    extra = -tensors[0].shape[2] % multiple
    return [F.pad(t, (0, 0, 0, extra)) for t in tensors] if extra else list(tensors)


def lean_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad:  # a trained norm (modules_to_save): its gradient is transformers' to compute
        return type(self).forward(self, hidden_states)
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def lean_gated_mlp(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(SiluGateFunction.apply(self.gate_proj(x), self.up_proj(x)))


def lean_blocks(model: torch.nn.Module) -> int:
    """Give each RMSNorm and SiLU-gated MLP that computes exactly what llama's do the lean backward
    pass above (an instance's own `forward`; the class is untouched). Returns how many were changed.

    transformers copies llama's RMSNorm and MLP into mistral, qwen2, qwen3, phi3 and more; a module
    qualifies when its class's forward is llama's instruction for instruction (and, for the MLP, its
    activation is SiLU), so a variant that computes otherwise (gemma's 1 + weight, phi3's fused
    gate_up_proj) keeps its own."""
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    changed = 0
    for module in model.modules():
        forward = getattr(type(module), "forward", None)
        code = getattr(forward, "__code__", None)
        if code is None:
            continue
        if code.co_code == LlamaRMSNorm.forward.__code__.co_code and code.co_names == LlamaRMSNorm.forward.__code__.co_names:
            module.forward = types.MethodType(lean_rms_norm, module)
            changed += 1
        elif (code.co_code == LlamaMLP.forward.__code__.co_code and code.co_names == LlamaMLP.forward.__code__.co_names
              and isinstance(getattr(module, "act_fn", None), (torch.nn.SiLU, SiLUActivation))):
            module.forward = types.MethodType(lean_gated_mlp, module)
            changed += 1
    return changed
