"""LoRA on tiny models of every claimed architecture: targets found, only adapters train."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mathtune.config import LoraConfig
from mathtune.errors import ConfigError
from mathtune.train.lora import apply_lora, count_parameters, find_linear_layers
from tests.conftest import TINY_ARCHS, tiny_config

EXPECTED_TARGETS = {
    "llama": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "mistral": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "qwen2": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "falcon": ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"],
    "opt": ["fc1", "fc2", "k_proj", "out_proj", "q_proj", "v_proj"],
    "gpt2": ["c_attn", "c_fc", "c_proj"],
}


def tiny_model(arch: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=128))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_linear_layers_found_without_the_output_head(arch):
    model = tiny_model(arch)
    assert find_linear_layers(model) == EXPECTED_TARGETS[arch]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_few_steps_change_every_lora_parameter_and_no_base_parameter(arch):
    model = apply_lora(tiny_model(arch), LoraConfig(r=4, alpha=8))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == set(EXPECTED_TARGETS[arch])

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (2, 12), generator=generator)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (name in trainable), f"{arch}: {name} {'changed' if changed else 'did not change'}"

    n_trainable, n_total = count_parameters(model)
    assert n_trainable == sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert n_total == sum(p.numel() for p in model.parameters())


def test_named_targets_that_do_not_exist_are_rejected_with_the_real_names():
    with pytest.raises(ConfigError, match="q_projection.*its linear layers are: down_proj"):
        apply_lora(tiny_model("llama"), LoraConfig(target_modules=["q_projection"]))


def test_rslora_and_dora_options_reach_peft():
    model = apply_lora(tiny_model("llama"), LoraConfig(r=4, alpha=8, use_rslora=True, use_dora=True))
    peft_config = model.peft_config["default"]
    assert peft_config.use_rslora and peft_config.use_dora
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
def test_the_seed_draws_the_same_float32_lora_weights_on_a_half_precision_base(arch, base_dtype):
    """The adapter PEFT gives a float32 base is the adapter apply_lora gives a bf16 or fp16 one, bit for
    bit: the A matrices are not the seed's draws rounded to the base's precision."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    full, half = tiny_model(arch), tiny_model(arch).to(base_dtype)
    torch.manual_seed(1)
    reference = get_peft_model(full, PeftLoraConfig(r=4, lora_alpha=8, target_modules=EXPECTED_TARGETS[arch],
                                                    lora_dropout=0.0, task_type="CAUSAL_LM"))
    after_reference = torch.rand(3)
    torch.manual_seed(1)
    model = apply_lora(half, LoraConfig(r=4, alpha=8, dropout=0.0))
    # The global RNG goes on as after PEFT's own draws: what the run draws next is unchanged.
    assert torch.equal(torch.rand(3), after_reference)
    expected = {n: p for n, p in reference.named_parameters() if "lora_" in n}
    got = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert expected.keys() == got.keys()
    for name, value in got.items():
        assert value.dtype == torch.float32, name
        assert torch.equal(value, expected[name]), name
    # Not bf16-rounded draws: those would equal their own round trip through bf16.
    a = next(v for n, v in got.items() if "lora_A" in n)
    assert not torch.equal(a, a.to(torch.bfloat16).float())


def test_lora_inputs_are_cast_by_peft_only_outside_autocast():
    """Where PEFT computes a LoRA layer (here: with dropout, which the fused function leaves to it),
    under bf16 autocast the layer's input goes to its product as it comes (bf16: autocast casts the
    float32 LoRA weights instead), not through a float32 copy that autocast casts back; outside
    autocast PEFT casts it to the float32 LoRA weights as before."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama", 400)).to(torch.bfloat16)
    model = apply_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1)).eval()
    seen = []
    layer = next(m for m in model.modules() if isinstance(m, LoraLayer))
    layer.lora_A["default"].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert seen == [torch.bfloat16, torch.float32]
    assert out.dtype == torch.bfloat16


def _autograd_nodes(tensor) -> Counter:
    """How many nodes of each kind the autograd graph behind `tensor` has."""
    seen, names, todo = set(), Counter(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names[type(node).__name__] += 1
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def _peft_copy(model):
    """A copy of `model` whose LoRA layers compute through PEFT's own Linear.forward."""
    import copy

    from peft.tuners.lora.layer import Linear

    plain = copy.deepcopy(model)
    for module in plain.modules():
        if type(module) is Linear:
            del module.forward
    return plain


@pytest.mark.parametrize("precision", ["float32", "bf16 autocast"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q, k and v have a bias
def test_the_fused_lora_layer_computes_what_peft_computes_and_merges_the_same(arch, precision):
    """Each LoRA linear layer computes as one LoraLinearFunction: the logits and every LoRA gradient
    are PEFT's own plain LoRA's, in float32 and under bf16 autocast (there each sum is rounded once
    instead of twice), and merging gives the same weights."""
    from peft.tuners.lora.layer import Linear

    bf16 = precision == "bf16 autocast"
    model = tiny_model(arch).to(torch.bfloat16 if bf16 else torch.float32)
    torch.manual_seed(1)
    model = apply_lora(model, LoraConfig(r=4, alpha=8))
    for name, param in model.named_parameters():  # B starts at zero: give the update an effect
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    plain = _peft_copy(model)

    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    results = []
    for m in (model, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = m(input_ids=ids).logits.float()
        results.append(_autograd_nodes(logits))
        logits.square().mean().backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
        results.append((logits.detach(), grads))
    fused_nodes, (fused_logits, fused_grads), plain_nodes, (plain_logits, plain_grads) = results
    lora_layers = sum(type(m) is Linear for m in model.modules())
    assert fused_nodes["LoraLinearFunctionBackward"] == lora_layers > 0 and not plain_nodes["LoraLinearFunctionBackward"]
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if bf16 else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(fused_logits, plain_logits, **tolerance)
    assert fused_grads.keys() == plain_grads.keys() and all(g is not None for g in fused_grads.values())
    for name in fused_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], **tolerance, msg=name)

    merged, plain_merged = model.merge_and_unload(), plain.merge_and_unload()
    for (name, weight), (_, plain_weight) in zip(merged.named_parameters(), plain_merged.named_parameters()):
        assert torch.equal(weight, plain_weight), name


def test_peft_computes_the_lora_layers_the_fused_function_does_not_cover():
    """Dropout, a disabled adapter, merged weights, float32 LoRA weights beside a bf16 base outside
    autocast (generation after training) and GPT-2's transposed Conv1D go through PEFT's own
    forward, and give what it gives."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])

    def fused(model, autocast=False) -> tuple[bool, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids).logits
        return _autograd_nodes(logits)["LoraLinearFunctionBackward"] > 0, logits.detach()

    def lora(arch, dtype=torch.float32, **options):
        torch.manual_seed(1)
        model = apply_lora(tiny_model(arch).to(dtype), LoraConfig(r=4, alpha=8, **options))
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05)
        return model

    assert fused(lora("llama"))[0]
    model = lora("llama", dropout=0.1).eval()
    assert not fused(model)[0]
    assert torch.equal(fused(model)[1], fused(_peft_copy(model))[1])
    model = lora("llama")
    with model.disable_adapter():
        assert not fused(model)[0]
    model = lora("llama", dtype=torch.bfloat16)
    assert fused(model, autocast=True)[0]
    assert not fused(model)[0]  # bf16 base, float32 LoRA, no autocast: PEFT casts
    assert torch.equal(fused(model)[1], fused(_peft_copy(model))[1])
    model = lora("gpt2")
    assert not fused(model)[0]
    model = lora("llama")
    model.merge_adapter()
    assert not fused(model)[0]
