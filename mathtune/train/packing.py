"""Attention of packed batches computed per example: no work across example boundaries.

    collator = packed_collator(boundaries=use_packed_attention(model))   # as train.build_trainer does
    Trainer(..., data_collator=collator, compute_loss_func=label_only_loss)   # mathtune/train/loss.py

A packed row of 8 GSM8K examples is ~1500 tokens. SDPA given the row's block-diagonal mask still
computes every query against every key of the row (1500 x 1500), and discards all but the diagonal
blocks; per example it is 8 blocks of ~190 x 190, 8x fewer products. With the collator's example
boundaries (`cu_seq_lens_q`, the same arguments flash-attention's variable-length kernels take),
this attention runs SDPA causally on each example's slice (on a CPU in bf16, its backward pass in
float32; with AMX, each slice padded to a multiple of 32 tokens: see LENGTH_MULTIPLE). Where those
arguments are absent (evaluation, generation with a cache, padded batches) it is exactly
transformers' SDPA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mathtune import hardware
from mathtune.data.tokenize import IGNORE_INDEX
from mathtune.train.blocks import FlashAttentionFloat32Backward, pad_tokens

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

PACKED_SDPA = "mathtune_packed_sdpa"


def packed_collator(boundaries: bool = True, keep_logits: bool = False):
    """Concatenates a batch into one row: position ids restart per example and the first label of
    each example is masked (so no example predicts the next one's first token). With `boundaries`,
    the example boundaries are passed on for the per-example attention; with `keep_logits` (a model
    whose forward takes `logits_to_keep`), the positions that predict a label, so that the output
    layer runs only there (`loss.label_only_loss` then scores exactly those)."""
    from transformers import DataCollatorWithFlattening


    flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX,
                                         return_flash_attn_kwargs=boundaries)
    if not keep_logits:
        return flatten

    def collate(features):
        batch = flatten(features)
        # Position i predicts token i + 1. With assistant-only labels about half the positions
        # predict none, and their full-vocabulary logits (49k floats a token for SmolLM2) are a
        # large share of the step.
        batch["logits_to_keep"] = (batch["labels"][0, 1:] != IGNORE_INDEX).nonzero().squeeze(-1)
        return batch

    return collate


def use_packed_attention(model) -> bool:
    """Switch a model that uses transformers' SDPA to the per-example SDPA; True when switched.

    Flash-attention (CUDA) already takes the boundaries natively and is left alone, as are models
    whose attention is not a transformers attention-interface function.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation not in ("sdpa", PACKED_SDPA) or not base._can_set_attn_implementation():
        return False
    _register()
    base.set_attn_implementation(PACKED_SDPA)
    return True


def packed_sdpa_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                          dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: query (1, heads, tokens, dim), key/value
    (1, kv heads, tokens, dim); returns (1, tokens, heads, dim)."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    bounds = kwargs.get("cu_seq_lens_q")
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    usable = (
        bounds is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]  # no cache
        and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
    )
    if usable:
        bounds = bounds.tolist()
        lengths = [end - start for start, end in zip(bounds, bounds[1:])]
        usable = bounds[-1] == query.shape[2] and (not window or max(lengths) <= window)
    if not usable:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1 and query.device.type != "cpu":
        # PyTorch's CPU flash kernel takes grouped keys and values as they are (fewer heads than the
        # queries): no repeated copies in the forward pass, no sums of their gradients in the
        # backward pass (SmolLM2, 3 key heads for 9 query heads: ~55 ms of a 2.7 s step).
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    multiple = LENGTH_MULTIPLE if amx_flash(query) else 1
    float32_backward = half_cpu_flash(query)
    # split, not slicing: the gradient of a split is one concatenation, of a slice a zero-filled
    # full-size tensor per example.
    pieces = [
        causal_sdpa(q, k, v, dropout=dropout, scaling=scaling, multiple=multiple, float32_backward=float32_backward)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2))
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


# PyTorch's CPU flash attention in bf16 (or fp16) on a CPU with AMX builds brgemm kernels for every
# sequence length it meets and keeps them, most of them in its backward pass. Per-example attention
# meets a new length with almost every example: at the end of the default run (Intel Xeon with AMX)
# the heap held 1.13 GB in use against 0.90 GB with padding, and the run peaked 0.58 GB higher. 160
# random lengths, forward and backward, grew the process by 754 MB; padded to a multiple of 32 (16
# lengths up to 512 tokens) by 66 MB; with the backward pass in float32 (causal_sdpa's
# float32_backward, also faster) by 58 MB unpadded and 25 MB padded. The kernels are kept in a cache
# that LRU_CACHE_CAPACITY sizes (torch 2.13: 1,024 by default); since mathtune/__init__.py bounds it
# to 64, the plain kernel grows by 203 MB over those lengths, still 8x the padded one. Without AMX
# the kernel is another one, with no such cache, and padding would only add work.
LENGTH_MULTIPLE = 32


def amx_flash(query: torch.Tensor) -> bool:
    """Whether SDPA over `query` runs the CPU flash kernel in bf16 or fp16 on AMX, the kernel that
    keeps brgemm kernels per length (so causal_sdpa pads to LENGTH_MULTIPLE)."""
    return half_cpu_flash(query) and hardware.cpu_bf16_units() == "AMX"


def half_cpu_flash(query: torch.Tensor) -> bool:
    """Whether SDPA over `query` runs PyTorch's CPU flash kernel in bf16 or fp16, whose backward
    pass was slower than its float32 one with each kind of bf16 units tried (so causal_sdpa runs the
    backward pass in float32). 8 examples of 96-288 tokens, SmolLM2's attention, backward pass
    (Intel Xeon, 2 cores, oneDNN limited with ONEDNN_MAX_CPU_ISA to stand in for CPUs without AMX):
    with AMX 22.4 ms in bf16 against 18.8 in float32; AVX512-BF16 only (the units of AMD Zen 4) 28.4
    against 18.0; no bf16 units (bf16 emulated) 43.4 against 17.0."""
    import torch

    return query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16)


def causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, dropout: float = 0.0,
                scaling: float | None = None, multiple: int = 1, float32_backward: bool = False) -> torch.Tensor:
    """Causal SDPA over one example (1, heads, length, dim; key and value may have fewer heads, a
    divisor of the queries': grouped-query attention), its length padded at the end to a
    multiple of `multiple`. The padded keys come after every real query, so causality hides them
    from each: the real rows are the same attention (rounded as the kernel's longer blocks round
    them), the padded rows are dropped, and their gradients are zero. With `float32_backward` (and no
    dropout), the CPU flash kernel's forward pass in the inputs' dtype and its backward pass in
    float32, on the real rows alone (`blocks.FlashAttentionFloat32Backward`)."""
    from torch.nn.functional import scaled_dot_product_attention

    if float32_backward and not dropout:
        return FlashAttentionFloat32Backward.apply(query, key, value, scaling, multiple)
    length = query.shape[2]
    out = scaled_dot_product_attention(*pad_tokens((query, key, value), multiple), dropout_p=dropout, scale=scaling,
                                       is_causal=True, enable_gqa=key.shape[1] != query.shape[1])
    return out if out.shape[2] == length else out[:, :, :length]


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    # Masks are built as for SDPA: the fallback needs them, the per-example path ignores them.
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


# Architectures whose attention keeps packed sequences apart when given restarting position_ids and
# no attention mask (transformers builds a block-diagonal mask from them). Each is checked by
# tests/train/test_packing.py; OPT is not here: it derives positions from the attention mask.
PADDING_FREE_ARCHS = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "falcon", "gpt2"}
)


def supports_padding_free(model: PreTrainedModel) -> bool:
    return getattr(model.config, "model_type", None) in PADDING_FREE_ARCHS
