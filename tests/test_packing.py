"""Padding-free packed batches and the label-only loss compute what padded batches compute."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DataCollatorForSeq2Seq, DataCollatorWithFlattening

from mathtune.config import LoraConfig
from mathtune.data.dataset import IGNORE_INDEX
from mathtune.lora import apply_lora
from mathtune.model import PADDING_FREE_ARCHS, supports_padding_free
from mathtune.train import LabelOnlyLossTrainer
from tests.conftest import TINY_ARCHS, tiny_config

VOCAB = 400  # the size of conftest's tokenizer, which pads the reference batch


def config_for(arch: str):
    if arch in TINY_ARCHS:
        return tiny_config(arch, VOCAB)
    return AutoConfig.for_model(arch, vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=2,
                                eos_token_id=2, bos_token_id=1)


def examples():
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length, prompt in ((7, 3), (12, 5), (18, 4)):
        ids = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def tiny(arch: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_for(arch))
    model.config.use_cache = False  # as train() sets it: packed rows are kept apart only without a cache
    return model


@pytest.mark.parametrize("arch", sorted(PADDING_FREE_ARCHS))
def test_packed_logits_equal_each_example_alone(arch):
    """Attention never crosses example boundaries in a packed row."""
    model = tiny(arch).eval()
    rows = examples()
    packed = DataCollatorWithFlattening(return_position_ids=True)([dict(r) for r in rows])
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        start = 0
        for row in rows:
            alone = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
            torch.testing.assert_close(logits[start : start + len(row["input_ids"])], alone, rtol=1e-4, atol=1e-5)
            start += len(row["input_ids"])


def test_opt_is_not_packed_because_its_positions_come_from_the_mask():
    assert not supports_padding_free(tiny("opt"))
    assert supports_padding_free(tiny("llama"))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_label_only_loss_and_gradients_equal_the_plain_padded_loss(arch, tmp_path, chatml_tokenizer):
    rows = examples()
    # eval(): no dropout (gpt2 has 0.1), so both computations see the same network; gradients still flow.
    reference = apply_lora(tiny(arch), LoraConfig(r=4, alpha=8)).eval()
    padded = DataCollatorForSeq2Seq(chatml_tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)([dict(r) for r in rows])
    plain = reference(**padded).loss  # full-vocabulary logits everywhere, mean over label tokens
    plain.backward()

    from transformers import TrainingArguments

    model = apply_lora(tiny(arch), LoraConfig(r=4, alpha=8)).eval()
    model.load_state_dict(reference.state_dict())
    trainer = LabelOnlyLossTrainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]))
    assert trainer._keeps_logits
    packed = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)([dict(r) for r in rows])
    labels_counted = int((packed["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert labels_counted == int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    loss = trainer.compute_loss(model, dict(packed), num_items_in_batch=labels_counted)
    loss.backward()

    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, param in reference.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6)
