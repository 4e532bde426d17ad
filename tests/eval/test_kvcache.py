"""The appending KV cache: DynamicCache's numbers, appended in place instead of by concatenation."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import MistralConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from mathtune.config import ModelConfig
from mathtune.eval.kvcache import AppendingLayer, appending_cache
from mathtune.model.load import load_model


def _states(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 2, length, 8, generator=generator),
            torch.randn(batch, 2, length, 8, generator=generator))


def test_tokens_are_written_into_the_buffer_and_the_layer_holds_what_concatenation_holds():
    layer, reference = AppendingLayer(room=3), DynamicLayer()
    storages = []
    for step, length in enumerate([5, 1, 1, 1, 1, 2]):  # the prompt, then tokens; room for 3 after the prompt
        keys, values = _states(4, length, step)
        got, expected = layer.update(keys, values), reference.update(keys, values)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        storages.append(layer.keys.untyped_storage().data_ptr())
    # One buffer for the prompt and its 3 tokens; a new one only when it was full (the 4th token).
    assert len(set(storages[:4])) == 1 and storages[4] != storages[3] and storages[5] == storages[4]
    assert layer.get_seq_length() == reference.get_seq_length() == 11

    rows = torch.tensor([0, 2])  # rows that stopped leave the batch
    layer.batch_select_indices(rows)
    reference.batch_select_indices(rows)
    keys, values = _states(2, 1, 9)
    got, expected = layer.update(keys, values), reference.update(keys, values)
    assert all(torch.equal(a, b) for a, b in zip(got, expected)) and got[0].shape == (2, 2, 12, 8)

    layer.crop(-3)
    reference.crop(-3)
    keys, values = _states(2, 1, 10)
    assert all(torch.equal(a, b) for a, b in zip(layer.update(keys, values), reference.update(keys, values)))


def test_only_full_attention_layers_append_in_place():
    config = MistralConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=64, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"])
    cache = appending_cache(SimpleNamespace(config=config), room=8)
    assert [type(layer) for layer in cache.layers] == [DynamicSlidingWindowLayer, AppendingLayer]


def test_generate_with_the_appending_cache_gives_the_dynamic_cache_tokens(tiny_llama_dir):
    model, tokenizer, _ = load_model(ModelConfig(path=str(tiny_llama_dir), dtype="float32"))
    model.eval()
    tokenizer.padding_side = "left"
    enc = tokenizer(["What is 12 * 7?", "2+2", "Solve x^2 = 9 for x, please, step by step."],
                    return_tensors="pt", padding=True)
    settings = dict(max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=[tokenizer.pad_token_id], return_dict_in_generate=True)
    with torch.no_grad():
        plain = model.generate(**enc, **settings).sequences
        cache = appending_cache(model, room=4)  # fuller than the room: reallocated twice on the way
        appended = model.generate(**enc, cache=cache, **settings).sequences
    assert torch.equal(plain, appended)
    assert isinstance(cache.layers[0], AppendingLayer) and cache.get_seq_length() == plain.shape[1] - 1
