"""How fast a training step could go if it did nothing but its matrix products, on this CPU.

    recorder = ProductRecorder()        # a TorchDispatchMode: every mm/addmm/bmm/baddbmm it sees, counted
    with recorder:
        loss = model(**batch).loss; loss.backward()
    ceiling = matrix_ceiling(recorder.products, tokens=batch_tokens)

`train_throughput.py` records the products of the mathtune row's first (warm-up, untimed) step and
prints two ceilings under its table, as tokens/s the products alone would allow:

- at the CPU's large-product rate: the step's FLOPs over the rate of a 4096 x 576 @ 576 x 1536
  product in the step's precision (how speed goals for a CPU's bf16 units are stated);
- at the products' own rate: each distinct product of the step (shapes, strides, dtype) run again
  alone and timed, the step's products summed. The gap between the two is what the shapes cost (thin
  LoRA factors, short packed rows); the gap between this one and the measured tokens/s is
  everything that is not a matrix product (attention's own kernels, casts, element-wise passes,
  the optimizer).

The products inside PyTorch's attention kernels are not dispatched as matrix products, so attention
is outside both ceilings, as it is in the usual FLOPs-per-token count (2 x parameters forward).
"""

from __future__ import annotations

import time
from collections import Counter
from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PRODUCTS = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_")  # the in-place ones too (LoraLinearFunction)
# The shape the large-product rate is measured at: SmolLM2's MLP, 4,096 tokens.
LARGE_PRODUCT = (4096, 576, 1536)


class ProductRecorder(TorchDispatchMode):
    """Counts each matrix product dispatched inside it by (op, operand shapes, strides, dtype).

    It sits below autograd and autocast, so it sees the backward pass's products and the dtypes
    autocast chose."""

    def __init__(self):
        super().__init__()
        self.products: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in PRODUCTS:
            operands = args[1:3] if name.startswith(("addmm", "baddbmm")) else args[:2]  # (input, mat1, mat2)
            self.products[(name,) + tuple((tuple(t.shape), tuple(t.stride()), str(t.dtype)[6:]) for t in operands)] += 1
        return func(*args, **(kwargs or {}))


def product_flops(key: tuple) -> int:
    """Multiply-adds x 2 of one recorded product: (m, k) @ (k, n), or a batch of them."""
    _, (a_shape, _, _), (b_shape, _, _) = key
    batch = a_shape[0] if len(a_shape) == 3 else 1
    return 2 * batch * a_shape[-2] * a_shape[-1] * b_shape[-1]


def _operand(shape: tuple, stride: tuple, dtype: str) -> torch.Tensor:
    """Random values laid out with the recorded strides (a transposed weight stays transposed)."""
    size = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0
    return torch.randn(size).to(getattr(torch, dtype)).as_strided(shape, stride)


def seconds_per_call(run, min_seconds: float = 0.05, min_calls: int = 3, repeats: int = 3) -> float:
    """Wall time of `run()` after one untimed call: the mean over at least `min_calls` calls and
    `min_seconds`, the best of `repeats` such means (as timeit advises: another process on the
    machine only ever makes a repeat slower; one float32 replay after training once ran its LoRA
    products at 4 GFLOP/s against 170-250 alone, a ceiling below the step's own rate)."""
    run()
    best = float("inf")
    for _ in range(repeats):
        calls, started = 0, time.perf_counter()
        while calls < min_calls or time.perf_counter() - started < min_seconds:
            run()
            calls += 1
        best = min(best, (time.perf_counter() - started) / calls)
    return best


def replay(products: Counter, min_seconds: float = 0.05) -> dict:
    """Each distinct recorded product run again alone: its seconds per call."""
    seconds = {}
    for key in products:
        name, (a_shape, a_stride, a_dtype), (b_shape, b_stride, b_dtype) = key
        a, b = _operand(a_shape, a_stride, a_dtype), _operand(b_shape, b_stride, b_dtype)
        product = torch.bmm if "bmm" in name else torch.mm
        seconds[key] = seconds_per_call(partial(product, a, b), min_seconds)
    return seconds


def large_product_rate(dtype: str, seconds: float = 1.0) -> float:
    """FLOP/s of a LARGE_PRODUCT product in `dtype`, sustained for about `seconds`."""
    m, k, n = LARGE_PRODUCT
    a, b = torch.randn(m, k).to(getattr(torch, dtype)), torch.randn(k, n).to(getattr(torch, dtype))
    return 2 * m * k * n / seconds_per_call(partial(torch.mm, a, b), min_seconds=seconds / 3)


def matrix_ceiling(products: Counter, tokens: int) -> dict:
    """The step's matrix FLOPs per token and the tokens/s its products alone would allow, at the
    large-product rate of their main dtype and at their own (replayed) rate."""
    flops = Counter()
    for key, count in products.items():
        flops[key[1][2]] += count * product_flops(key)
    total = sum(flops.values())
    dtype = flops.most_common(1)[0][0]
    large_rate = large_product_rate(dtype)
    seconds = replay(products)
    replayed = sum(count * seconds[key] for key, count in products.items())
    # The distinct products by the share of the replayed time they take, slowest first.
    by_time = sorted(products, key=lambda key: -products[key] * seconds[key])
    return {
        "tokens": tokens,
        "products": sum(products.values()),
        "distinct_products": len(products),
        "flops_per_token": total / tokens,
        "dtype": dtype,
        "large_product_flops_per_second": large_rate,
        "large_product_tokens_per_second": large_rate * tokens / total,
        "replayed_seconds": replayed,
        "replayed_flops_per_second": total / replayed,
        "replayed_tokens_per_second": tokens / replayed,
        "shapes": [{"op": key[0], "a": key[1], "b": key[2], "count": products[key],
                    "share": products[key] * seconds[key] / replayed,
                    "flops_per_second": product_flops(key) / seconds[key]} for key in by_time],
    }


def describe(ceiling: dict, tokens_per_second: float) -> str:
    """One line for the benchmark's table."""
    c = ceiling
    m, k, n = LARGE_PRODUCT
    return (f"matrix ceiling (mathtune's first step: {c['products']:,} products of {c['distinct_products']} shapes, "
            f"{c['flops_per_token'] / 1e9:.3f} GFLOP per real token, attention's kernels not counted): at the large-"
            f"product rate ({c['large_product_flops_per_second'] / 1e9:,.0f} GFLOP/s, {c['dtype']} {m} x {k} @ {k} x {n}) "
            f"{c['large_product_tokens_per_second']:,.0f} tokens/s, mathtune reaches "
            f"{100 * tokens_per_second / c['large_product_tokens_per_second']:.1f}%; at the products' own rate "
            f"(replayed: {c['replayed_flops_per_second'] / 1e9:,.0f} GFLOP/s) {c['replayed_tokens_per_second']:,.0f} "
            f"tokens/s, mathtune reaches {100 * tokens_per_second / c['replayed_tokens_per_second']:.1f}%"
            + (" (a ceiling below the measured rate: the machine was busy while the products were timed; run it "
               "again)" if tokens_per_second > min(c["large_product_tokens_per_second"],
                                                    c["replayed_tokens_per_second"]) else ""))
