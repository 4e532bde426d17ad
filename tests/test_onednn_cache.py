"""mathtune bounds oneDNN's and ideep's kernel caches (mathtune/__init__.py): each cached bf16 kernel
keeps a repacked copy of its weight, and packed training batches bring new shapes every step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mathtune.hardware import cpu_bf16_units

GROWTH = """
import os, sys, torch
{set_up}
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
w = torch.randn(1536, 576, dtype=torch.bfloat16)
torch.nn.functional.linear(torch.randn(8, 576, dtype=torch.bfloat16), w)
before = rss()
for rows in range(100, 400):  # a new shape each time, as packed batches of changing length give
    torch.nn.functional.linear(torch.randn(rows, 576, dtype=torch.bfloat16), w)
print(rss() - before)
"""


CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def _run(code: str, **env) -> str:
    environ = {k: v for k, v in os.environ.items() if k not in CACHES} | env
    return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("cache", CACHES)
def test_importing_mathtune_bounds_each_cache_and_keeps_a_value_already_set(cache):
    show = f"import os, mathtune; print(os.environ['{cache}'])"
    assert _run(show) == "64"
    assert _run(show, **{cache: "1024"}) == "1024"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.skipif(not cpu_bf16_units(), reason="oneDNN's bf16 kernels run where the CPU has bf16 units")
def test_bf16_products_of_many_shapes_keep_less_memory_after_importing_mathtune():
    bounded = int(_run(GROWTH.format(set_up="import mathtune")))
    unbounded = int(_run(GROWTH.format(set_up="")))
    # 300 shapes: 64 cached kernels in each cache instead of 300 (measured: 134 MB against 220 MB on an
    # Intel Xeon).
    assert unbounded - bounded > 20 * 2**20, (bounded, unbounded)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.skipif(not cpu_bf16_units(), reason="oneDNN's bf16 kernels run where the CPU has bf16 units")
def test_ideeps_cache_is_bounded_too():
    """oneDNN's cache bounded alike in both processes: what is left is ideep's (LRU_CACHE_CAPACITY)."""
    bounded = int(_run(GROWTH.format(set_up="import mathtune")))
    unbounded = int(_run(GROWTH.format(set_up=""), ONEDNN_PRIMITIVE_CACHE_CAPACITY="64"))
    # measured on an Intel Xeon: 134 MB against 175 MB
    assert unbounded - bounded > 20 * 2**20, (bounded, unbounded)
