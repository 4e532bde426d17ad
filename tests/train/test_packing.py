"""Padding-free packed batches, per-example attention and the label-only loss compute what padded
batches with full-vocabulary logits compute: same logits, same loss, same LoRA gradients."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DataCollatorForSeq2Seq

from mathtune import hardware
from mathtune.config import LoraConfig
from mathtune.data.tokenize import IGNORE_INDEX
from mathtune.train import packing
from mathtune.train.lora import apply_lora
from mathtune.train.loss import label_only_loss
from mathtune.train.packing import (
    LENGTH_MULTIPLE,
    PACKED_SDPA,
    PADDING_FREE_ARCHS,
    amx_flash,
    causal_sdpa,
    half_cpu_flash,
    packed_collator,
    supports_padding_free,
    use_packed_attention,
)
from mathtune.train.recipe import RunTrainer
from tests.conftest import ROOT, TINY_ARCHS, tiny_config

VOCAB = 400  # the size of conftest's tokenizer, which pads the reference batch


def config_for(arch: str):
    if arch in TINY_ARCHS:
        return tiny_config(arch, VOCAB)
    return AutoConfig.for_model(arch, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=2,
                                eos_token_id=2, bos_token_id=1)


def labelled_rows(seed: int, shapes: tuple[tuple[int, int], ...]) -> list[dict]:
    """Random examples of (length, prompt tokens) each, labelled after the prompt (also tests/train/test_loss.py)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for length, prompt in shapes:
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def examples():
    return labelled_rows(0, ((7, 3), (12, 5), (18, 4)))


def tiny(arch: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_for(arch))
    model.config.use_cache = False  # as train() sets it: packed rows are kept apart only without a cache
    return model


def packed_inputs(model, rows, per_example: bool) -> dict:
    """The batch train.build_trainer feeds: per_example switches the model to mathtune's attention."""
    boundaries = use_packed_attention(model) if per_example else False
    batch = packed_collator(boundaries)([dict(r) for r in rows])
    return {k: v for k, v in batch.items() if k != "labels"}


# Falcon's attention is not a transformers attention-interface function and gemma2 defaults to eager
# attention: both keep the masked row.
PER_EXAMPLE_ARCHS = PADDING_FREE_ARCHS - {"falcon", "gemma2"}


def assert_each_example_as_if_alone(model, rows, inputs) -> None:
    """The packed row's logits, example by example, equal each example run on its own."""
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        start = 0
        for row in rows:
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(logits[start : start + len(row["input_ids"])], alone, rtol=1e-4, atol=1e-5)
            start += len(row["input_ids"])


@pytest.mark.parametrize("per_example", [False, True], ids=["masked-row", "per-example"])
@pytest.mark.parametrize("arch", sorted(PADDING_FREE_ARCHS))
def test_packed_logits_equal_each_example_alone(arch, per_example):
    """Attention never crosses example boundaries in a packed row (masked, or computed per example)."""
    model = tiny(arch).eval()
    rows = examples()
    inputs = packed_inputs(model, rows, per_example)
    if per_example:
        assert (model.config._attn_implementation == PACKED_SDPA) == (arch in PER_EXAMPLE_ARCHS)
        assert ("cu_seq_lens_q" in inputs) == (arch in PER_EXAMPLE_ARCHS)
    assert_each_example_as_if_alone(model, rows, inputs)


def test_opt_is_not_packed_because_its_positions_come_from_the_mask():
    assert not supports_padding_free(tiny("opt"))
    assert supports_padding_free(tiny("llama"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2", "falcon"])
def test_label_only_loss_and_gradients_equal_the_plain_padded_loss(arch, tmp_path, chatml_tokenizer):
    """The whole optimised step (packed row, per-example attention, head and loss at label positions
    only) against the plain one (padded batch, full-vocabulary logits everywhere)."""
    rows = examples()
    # eval(): no dropout (gpt2 has 0.1), so both computations see the same network; gradients still flow.
    reference = apply_lora(tiny(arch), LoraConfig(r=4, alpha=8)).eval()
    padded = DataCollatorForSeq2Seq(chatml_tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)([dict(r) for r in rows])
    plain = reference(**padded).loss  # full-vocabulary logits everywhere, mean over label tokens
    plain.backward()

    from transformers import TrainingArguments

    model = apply_lora(tiny(arch), LoraConfig(r=4, alpha=8)).eval()
    model.load_state_dict(reference.state_dict())
    trainer = RunTrainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]),
                         compute_loss_func=label_only_loss)
    packed = packed_collator(boundaries=use_packed_attention(model), keep_logits=True)([dict(r) for r in rows])
    assert "logits_to_keep" in packed
    assert (model.get_base_model().config._attn_implementation == PACKED_SDPA) == (arch in PER_EXAMPLE_ARCHS)
    labels_counted = int((packed["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert labels_counted == int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss = trainer.compute_loss(model, dict(packed), num_items_in_batch=labels_counted)
    loss.backward()

    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, param in reference.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_without_boundaries_the_attention_is_transformers_sdpa(arch, chatml_tokenizer):
    """Evaluation and generation (padded, left-padded, with a cache) run exactly as before."""
    reference, model = tiny(arch).eval(), tiny(arch).eval()
    assert use_packed_attention(model)
    chatml_tokenizer.padding_side = "left"
    try:
        batch = chatml_tokenizer(["What is 12 * 7?", "Solve 2x + 3 = 11. Subtract 3"], return_tensors="pt", padding=True)
    finally:
        chatml_tokenizer.padding_side = "right"
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)
        settings = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 2, "use_cache": True}
        assert torch.equal(model.generate(**batch, **settings), reference.generate(**batch, **settings))


def test_a_sliding_window_shorter_than_an_example_falls_back_to_the_masked_row():
    config = config_for("mistral")
    config.sliding_window = 4  # shorter than every example: each token sees only the 4 before it
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.config.use_cache = False
    rows = examples()
    inputs = packed_inputs(model, rows, per_example=True)
    assert_each_example_as_if_alone(model, rows, inputs)


def test_build_trainer_packs_with_per_example_attention(tmp_path, tiny_llama_dir):
    from mathtune.config import load_config
    from mathtune.train.recipe import build_trainer

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), LoraConfig(r=4, alpha=8))
    cfg = load_config(overrides={"train.max_steps": 1})
    trainer = build_trainer(cfg, model, None, [], [], tmp_path, "cpu", main_process=False)
    batch = trainer.data_collator([dict(r) for r in examples()])
    assert batch["input_ids"].shape[0] == 1 and batch["cu_seq_lens_q"].tolist() == [0, 7, 19, 37]
    assert model.get_base_model().config._attn_implementation == PACKED_SDPA

    cfg = load_config(overrides={"train.max_steps": 1, "train.padding_free": False})
    plain = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), LoraConfig(r=4, alpha=8))
    build_trainer(cfg, plain, None, [], [], tmp_path / "plain", "cpu", main_process=False)
    assert plain.get_base_model().config._attn_implementation == "sdpa"


def test_packed_rows_take_the_per_example_path_not_the_masked_fallback(monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa

    model = tiny("llama").eval()
    inputs = packed_inputs(model, examples(), per_example=True)

    def masked_row(*args, **kwargs):
        raise AssertionError("fell back to SDPA over the whole row")

    monkeypatch.setattr(sdpa, "sdpa_attention_forward", masked_row)
    with torch.no_grad():
        model(**inputs)
    del inputs["cu_seq_lens_q"]
    with pytest.raises(AssertionError, match="fell back"), torch.no_grad():
        model(**inputs)


def test_an_example_padded_to_a_multiple_keeps_its_attention_and_gradients():
    """causal_sdpa's padded keys come after every real query: the real rows' outputs and the
    gradients of q, k and v are those of the unpadded example (float32, to rounding)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v, upstream = (torch.randn(1, 4, 37, 8, generator=generator) for _ in range(4))
    results = []
    for multiple in (1, 32):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = causal_sdpa(*inputs, multiple=multiple)
        out.backward(upstream)
        assert out.shape == q.shape
        results.append([out.detach()] + [t.grad for t in inputs])
    for plain, padded in zip(*results):
        torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("units", "dtype", "amx", "half"), [
    ("AMX", torch.bfloat16, True, True), ("AMX", torch.float16, True, True), ("AMX", torch.float32, False, False),
    ("AVX512-BF16", torch.bfloat16, False, True), (None, torch.bfloat16, False, True), (None, torch.float32, False, False),
])
def test_only_the_amx_flash_kernel_gets_padded_examples_and_every_half_cpu_kernel_a_float32_backward(
        monkeypatch, units, dtype, amx, half):
    monkeypatch.setattr(hardware, "cpu_bf16_units", lambda: units)
    query = torch.zeros(1, 2, 3, 4, dtype=dtype)
    assert amx_flash(query) is amx
    assert half_cpu_flash(query) is half


def test_packed_attention_pads_on_amx_and_runs_the_backward_in_float32_in_bf16(monkeypatch):
    """The packed attention passes the padding to causal_sdpa on AMX only, the float32 backward pass
    wherever the CPU kernel runs in bf16, and neither in float32."""
    class Attention:
        num_key_value_groups = 1
        is_causal = True

    calls = []
    monkeypatch.setattr(packing, "causal_sdpa", lambda q, k, v, **kw: calls.append(kw) or q)
    for units, dtype in (("AMX", torch.bfloat16), ("AVX512-BF16", torch.bfloat16), ("AMX", torch.float32)):
        monkeypatch.setattr(hardware, "cpu_bf16_units", lambda units=units: units)
        q = torch.zeros(1, 2, 10, 4, dtype=dtype)
        packing.packed_sdpa_attention(Attention(), q, q, q, None, cu_seq_lens_q=torch.tensor([0, 4, 10]))
    assert [(c["multiple"], c["float32_backward"]) for c in calls] == (
        [(LENGTH_MULTIPLE, True)] * 2 + [(1, True)] * 2 + [(1, False)] * 2)


def test_grouped_keys_reach_the_cpu_kernel_as_they_are(monkeypatch):
    """On a CPU the per-example attention hands the flash kernel 2 key/value heads for 6 query
    heads, not repeated copies of them."""
    class Attention:
        num_key_value_groups = 3
        is_causal = True

    calls = []
    monkeypatch.setattr(packing, "causal_sdpa", lambda q, k, v, **kw: calls.append((q.shape[1], k.shape[1], v.shape[1])) or q)
    q, kv = torch.zeros(1, 6, 10, 4), torch.zeros(1, 2, 10, 4)
    packing.packed_sdpa_attention(Attention(), q, kv, kv, None, cu_seq_lens_q=torch.tensor([0, 4, 10]))
    assert calls == [(6, 2, 2)] * 2


@pytest.mark.parametrize(("dtype", "float32_backward", "multiple"), [
    (torch.float32, False, 1), (torch.bfloat16, True, 1), (torch.bfloat16, True, 32)])
def test_grouped_keys_give_the_attention_and_gradients_of_repeated_ones(dtype, float32_backward, multiple):
    """causal_sdpa over 2 key/value heads for 6 query heads computes what it computes over the keys
    repeated (transformers' repeat_kv): the same output, and key/value gradients that are the sums
    of the repeated heads' (in float32 before the one rounding to bf16, hence the tolerance)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    generator = torch.Generator().manual_seed(0)
    q, upstream = (torch.randn(1, 6, 45, 16, generator=generator).to(dtype) for _ in range(2))
    k, v = (torch.randn(1, 2, 45, 16, generator=generator).to(dtype) for _ in range(2))
    results = []
    for grouped in (True, False):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        key, value = inputs[1:] if grouped else (repeat_kv(t, 3) for t in inputs[1:])
        out = causal_sdpa(inputs[0], key, value, multiple=multiple, float32_backward=float32_backward)
        out.backward(upstream)
        results.append([out.detach()] + [t.grad for t in inputs])
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    assert torch.equal(results[0][0], results[1][0])
    for grouped, repeated in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(grouped, repeated, **tolerance)


@pytest.mark.parametrize("multiple", [1, 32])
def test_the_float32_backward_gives_the_attention_of_the_inputs_dtype_and_closer_gradients(multiple):
    """Forward in bf16 (the same kernel, the same output bit for bit), backward in float32: every
    gradient at least as close to float64's as the bf16 kernel's, on average over its elements."""
    generator = torch.Generator().manual_seed(0)
    q, k, v, upstream = (torch.randn(1, 4, 45, 16, generator=generator).bfloat16() for _ in range(4))
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    torch.nn.functional.scaled_dot_product_attention(*exact, is_causal=True).backward(upstream.double())
    results = {}
    for float32_backward in (False, True):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = causal_sdpa(*inputs, multiple=multiple, float32_backward=float32_backward)
        out.backward(upstream)
        assert out.dtype == torch.bfloat16 and all(t.grad.dtype == torch.bfloat16 for t in inputs)
        results[float32_backward] = out.detach(), [(t.grad.double() - e.grad).abs().mean() for t, e in zip(inputs, exact)]
    assert torch.equal(results[True][0], results[False][0])
    for lean, plain in zip(results[True][1], results[False][1]):
        assert lean <= plain


def test_a_padded_example_runs_the_float32_backward_on_its_real_rows_alone():
    """Padded to 64 for the forward kernel, an example of 45 tokens goes through the backward
    kernel at 45: the padding's share of the backward pass is not computed."""
    from torch.profiler import profile

    generator = torch.Generator().manual_seed(0)
    q, k, v, upstream = (torch.randn(1, 4, 45, 16, generator=generator).bfloat16() for _ in range(4))
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    with profile(record_shapes=True) as prof:
        causal_sdpa(*inputs, multiple=32, float32_backward=True).backward(upstream)
    lengths = {e.name: e.input_shapes[0][2] for e in prof.events()
               if e.name.startswith("aten::_scaled_dot_product_flash_attention_for_cpu")}
    assert lengths == {"aten::_scaled_dot_product_flash_attention_for_cpu": 64,
                       "aten::_scaled_dot_product_flash_attention_for_cpu_backward": 45}
    assert all(t.grad.shape == t.shape for t in inputs)


KERNEL_GROWTH = """
import random, torch
from mathtune.train import packing
if {plain}:  # the kernel as it is: bf16 forward and backward, no padding
    packing.amx_flash = packing.half_cpu_flash = lambda query: False

class Attention:
    num_key_value_groups = 1
    is_causal = True

def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024

def step(lengths):
    bounds = torch.tensor([0] + lengths).cumsum(0)
    q, k, v = (torch.randn(1, 9, sum(lengths), 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out, _ = packing.packed_sdpa_attention(Attention(), q, k, v, None, cu_seq_lens_q=bounds)
    out.sum().backward()

step([64, 64])
before = rss()
random.seed(0)
for _ in range(20):  # 8 examples of new lengths a step, as packed training batches bring them
    step([random.randint(40, 300) for _ in range(8)])
print(rss() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.skipif(hardware.cpu_bf16_units() != "AMX", reason="the per-length kernels are the AMX flash kernel's")
def test_packed_attention_of_many_example_lengths_does_not_keep_a_kernel_for_each():
    def growth(plain: bool) -> int:
        code = KERNEL_GROWTH.format(plain=plain)
        return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.strip())

    # 160 example lengths; measured on an Intel Xeon with AMX: 25 MB, against 203 MB for the bf16
    # kernel as it is (751 MB before `import mathtune` set LRU_CACHE_CAPACITY; 58 MB with the float32
    # backward pass alone, unpadded)
    ours, plain = growth(False), growth(True)
    assert ours < 100 * 2**20 < 150 * 2**20 < plain, (ours, plain)
