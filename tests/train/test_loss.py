"""The output layer fused with the loss computes what the plain label-only loss computes from the
model's logits: the same loss and the same LoRA gradients, in float32 and under bf16 autocast; and
it touches nothing outside the Trainer's loss computation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from mathtune.config import LoraConfig
from mathtune.data.tokenize import IGNORE_INDEX
from mathtune.train import loss as loss_module
from mathtune.train.lora import apply_lora
from mathtune.train.loss import OutputLayerLoss, fusable_output_layer, label_only_loss
from mathtune.train.packing import packed_collator, use_packed_attention
from mathtune.train.recipe import RunTrainer, build_trainer
from tests.conftest import tiny_config
from tests.train.test_packing import VOCAB, labelled_rows


def rows():
    return labelled_rows(1, ((9, 3), (14, 6), (21, 5)))


def lora_model(arch: str, dtype=torch.float32):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, VOCAB)).to(dtype)
    model.config.use_cache = False
    torch.manual_seed(1)
    model = apply_lora(model, LoraConfig(r=4, alpha=8))
    for name, param in model.named_parameters():  # B starts at zero: give the adapter an effect to differentiate
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return model.train()


def loss_and_grads(model, compute_loss, batch, tmp_path, bf16: bool):
    trainer = RunTrainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]),
                         compute_loss_func=compute_loss)
    count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=count)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
def test_fused_output_layer_loss_equals_the_loss_of_the_logits(arch, bf16, tmp_path, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * VOCAB * 7)  # 16 rows a chunk: several chunks
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = lora_model(arch, dtype)
    batch = packed_collator(boundaries=use_packed_attention(model), keep_logits=True)(rows())
    plain, plain_grads = loss_and_grads(model, label_only_loss, batch, tmp_path, bf16)
    head = fusable_output_layer(model)
    assert head is model.get_base_model().lm_head
    fused, fused_grads = loss_and_grads(model, OutputLayerLoss(head), batch, tmp_path, bf16)

    tolerance = {"rtol": 2e-2, "atol": 1e-3} if bf16 else {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(fused, plain, **tolerance)
    assert plain_grads.keys() == fused_grads.keys() and len(plain_grads) > 0
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(fused_grads[name], grad, **tolerance)


def test_the_output_layer_runs_as_usual_outside_the_loss(tmp_path):
    """Generation, evaluation and direct calls see the real logits: the hook only acts while the
    Trainer computes the loss."""
    model = lora_model("llama")
    ids = torch.tensor([rows()[0]["input_ids"]])
    before = model(input_ids=ids).logits
    OutputLayerLoss(fusable_output_layer(model))
    after = model(input_ids=ids).logits
    assert after.shape == (1, ids.shape[1], VOCAB)
    torch.testing.assert_close(after, before)


def test_only_a_plain_frozen_output_layer_is_fused():
    model = lora_model("llama")
    assert fusable_output_layer(model) is not None
    model.get_base_model().config.final_logit_softcapping = 30.0  # gemma2's: the logits are not used as they come
    assert fusable_output_layer(model) is None
    model.get_base_model().config.final_logit_softcapping = None
    model.get_base_model().lm_head.weight.requires_grad_(True)  # a trained head would need its own gradient
    assert fusable_output_layer(model) is None


def test_build_trainer_fuses_the_output_layer_of_packed_batches(tmp_path, tiny_llama_dir, chatml_tokenizer):
    from mathtune.config import load_config
    from mathtune.model.load import load_model

    cfg = load_config(overrides={"model.path": str(tiny_llama_dir), "train.max_steps": 1})
    model, tokenizer, _ = load_model(cfg.model)
    model = apply_lora(model, cfg.lora)
    trainer = build_trainer(cfg, model, tokenizer, [], [], tmp_path, "cpu", main_process=False)
    assert isinstance(trainer.compute_loss_func, OutputLayerLoss)
    cfg.train.padding_free = False  # padded batches keep every position's logits: the plain loss
    trainer = build_trainer(cfg, model, tokenizer, [], [], tmp_path, "cpu", main_process=False)
    assert trainer.compute_loss_func is label_only_loss
