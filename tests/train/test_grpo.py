"""GRPO (train.method: grpo): the problems, the rewards, learning from a reward, and a whole run."""

from __future__ import annotations

import json

import datasets
import pytest
from safetensors.torch import load_file

from mathtune.cli import main
from mathtune.config import load_config
from mathtune.errors import DataError
from mathtune.train import grpo
from mathtune.train.grpo import correctness, format_reward, grpo_problems
from mathtune.train.recipe import train
from mathtune.verify import validate_math_response
from tests.conftest import math_records, write_jsonl


def conversations(rows):
    return datasets.Dataset.from_list([{"messages": m, "topic": None} for m in rows])


def test_problems_are_the_prompts_with_a_checkable_reference_and_the_rest_are_counted():
    rows = [
        [{"role": "system", "content": "Responde en español."}, {"role": "user", "content": "¿7·8?"},
         {"role": "assistant", "content": "7·8 = 56. \\boxed{56}"}],
        [{"role": "user", "content": "¿Qué es una derivada?"},
         {"role": "assistant", "content": "La derivada mide cómo cambia una función en cada punto."}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "¿Y 3+3?"}, {"role": "assistant", "content": "La respuesta es 6."}],
    ]
    problems, left_out = grpo_problems(conversations(rows))

    assert left_out == 1
    assert problems["prompt"] == [rows[0][:2], rows[2][:3]]  # system prompt and earlier turns kept
    assert problems["reference"] == ["7·8 = 56. \\boxed{56}", "La respuesta es 6."]


def test_no_checkable_problem_is_refused_with_the_reason():
    rows = [[{"role": "user", "content": "Define un vector."}, {"role": "assistant", "content": "Un segmento orientado."}]]
    with pytest.raises(DataError, match="none of the 1 training records has a reference with a checkable final answer"):
        grpo_problems(conversations(rows))


RESPONSES = [
    ("6 + 6 = 12.\nLa respuesta es 12.", "... La respuesta es \\boxed{12}."),
    ("The answer is 3/4", "\\frac{3}{4}"),
    ("Son 14 manzanas", "#### 15"),
    ("", "\\boxed{2}"),
    ("x = 3 o x = -2, so \\boxed{-2, 3}", "The solutions are -2 and 3: \\boxed{\\{-2, 3\\}}"),
    ("La respuesta es 25%", "0.25"),
    ("1,000", "1000"),
    ("no lo sé", "\\boxed{7}"),
]


@pytest.mark.parametrize(("response", "reference"), RESPONSES)
def test_the_correctness_reward_is_the_evaluations_verdict(response, reference):
    completion = [{"role": "assistant", "content": response}]
    expected = float(validate_math_response(response.strip(), reference).correct)
    assert correctness([completion], [reference]) == [expected]
    assert correctness([response], [reference]) == [expected]  # plain-text prompts give plain completions


def test_the_format_reward_wants_a_stated_answer_that_was_not_cut_off():
    reward = format_reward([2])
    completions = ["So \\boxed{5}", "La respuesta es 5.", "5 + 5 = 10 and then", "So \\boxed{5}"]
    ids = [[7, 8, 2], [7, 2], [7, 2], [7, 8, 9]]  # the last one hit the length limit: no stop token
    assert reward(completions, completion_ids=ids) == [1.0, 1.0, 0.0, 0.0]


def grpo_config(tmp_path, model_dir, **settings):
    data = write_jsonl(tmp_path / "math.jsonl", math_records(24))
    overrides = {
        "model.path": str(model_dir), "data.files": [str(data)], "data.eval_fraction": 0.25,
        "train.method": "grpo", "lora.r": 8, "lora.alpha": 16, "train.max_steps": 4, "train.logging_steps": 1,
        "train.save_steps": 2, "train.warmup_ratio": 0, "grpo.prompts_per_step": 2, "grpo.num_generations": 4,
        "grpo.max_completion_length": 8, "eval.max_examples": 3, "eval.max_new_tokens": 6,
        "output.dir": str(tmp_path / "run"), **settings,
    }
    return load_config(overrides=overrides, environ={})


def digit_share(completions, **_):
    """A toy reward a model can learn in a few steps: the share of digits in its answer."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def test_grpo_raises_a_learnable_reward_within_a_few_steps(tmp_path, model_cache, monkeypatch):
    # mathtune's GRPO path (LoRA, GRPOConfig from the settings, TRL's sampling and loss) on SmolLM2,
    # with a dense toy reward in place of the verifier. (A tiny random model cannot learn one: its
    # final norm and frozen output layer leave its next-token distribution nearly uniform.)
    monkeypatch.setattr(grpo, "reward_functions", lambda cfg, stops: [digit_share])
    data = write_jsonl(tmp_path / "math.jsonl", math_records(24))
    cfg = load_config(overrides={
        "model.cache_dir": str(model_cache), "data.files": [str(data)], "data.eval_fraction": 0.25,
        "train.method": "grpo", "lora.r": 8, "lora.alpha": 16, "train.max_steps": 8, "train.logging_steps": 1,
        "train.save_steps": 100, "train.warmup_ratio": 0, "train.lr_scheduler": "constant",
        "grpo.prompts_per_step": 4, "grpo.num_generations": 4, "grpo.max_completion_length": 16,
        "grpo.learning_rate": 2e-3, "grpo.format_reward": 0, "grpo.beta": 0, "eval.at_end": False,
        "output.dir": str(tmp_path / "run")}, environ={})
    train(cfg)

    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [line["rewards/digit_share/mean"] for line in lines if "rewards/digit_share/mean" in line]
    assert len(rewards) == 8
    # Measured on an AMD EPYC (Zen 4): 0.06 0.13 0.18 0.34 0.41 0.90 1.00 0.76 (seeded).
    assert sum(rewards[-3:]) / 3 > sum(rewards[:2]) / 2 + 0.3, rewards


def test_a_grpo_run_logs_its_rewards_checkpoints_and_resumes(tmp_path, tiny_llama_dir):
    cfg = grpo_config(tmp_path, tiny_llama_dir, **{"train.max_steps": 2, "eval.at_end": False})
    summary = train(cfg).summary
    run = tmp_path / "run"

    assert summary["method"] == "grpo" and summary["steps"] == 2
    assert summary["train_examples"] == 18 and summary["left_out_unchecked"] == 0
    assert summary["eval_loss_before"] is None  # GRPO's evaluation is the verified accuracy
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("reward", "reward_std", "rewards/correctness/mean", "rewards/format/mean", "completions/mean_length",
                "kl", "step_time", "generation/seconds", "generation/tokens_per_second"):
        assert key in line, key
    assert 0 < line["generation/seconds"] <= line["step_time"]
    # Only the trained adapter is saved (TRL keeps a frozen copy of the starting one as "ref").
    assert not (run / "adapter" / "ref").exists()
    assert (run / "checkpoints" / "checkpoint-2").is_dir()

    resumed = train(load_config(run / "config.yaml", {"train.max_steps": 4}, environ={}), resume=True).summary
    assert resumed["steps"] == 4 and resumed["steps_this_session"] == 2
    assert resumed["resumed_from"].endswith("checkpoint-2")
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in logged if "reward" in line] == [1, 2, 3, 4]


def test_grpo_from_an_sft_adapter_starts_from_it_and_scores_against_it(tmp_path, tiny_llama_dir):
    sft = load_config(overrides={"model.path": str(tiny_llama_dir), "data.files": [str(write_jsonl(
        tmp_path / "math.jsonl", math_records(24)))], "data.eval_fraction": 0.25, "train.max_steps": 2,
        "train.batch_size": 4, "lora.r": 4, "lora.alpha": 8, "eval.at_end": False,
        "output.dir": str(tmp_path / "sft")}, environ={})
    train(sft)

    code = main(["train", "--method", "grpo", "--init-from", str(tmp_path / "sft"), "--output", str(tmp_path / "grpo"),
                 "--set", "train.max_steps=1", "--set", "grpo.prompts_per_step=2", "--set", "grpo.num_generations=2",
                 "--set", "grpo.max_completion_length=6", "--set", "eval.max_examples=3",
                 "--set", "eval.max_new_tokens=4"])
    assert code == 0
    cfg = load_config(tmp_path / "grpo" / "config.yaml", environ={})
    assert cfg.model.adapter == tmp_path / "sft" / "adapter"
    # The model and data are the SFT run's, so the held-out problems are the same.
    assert cfg.model.path == sft.model.path and cfg.data == sft.data and cfg.train.seed == sft.train.seed
    assert cfg.lora.r == 16  # not used: the adapter's own rank is
    start = load_file(tmp_path / "sft" / "adapter" / "adapter_model.safetensors")
    after = load_file(tmp_path / "grpo" / "adapter" / "adapter_model.safetensors")
    assert start.keys() == after.keys() and next(iter(start.values())).shape[0] == 4
    summary = json.loads((tmp_path / "grpo" / "eval" / "summary.json").read_text())
    assert summary["base_label"] == "start" and "sft" in summary["baseline"]


def test_an_adapter_of_another_model_is_refused_by_name(tmp_path, tiny_llama_dir):
    cfg = grpo_config(tmp_path, tiny_llama_dir, **{"model.adapter": str(tmp_path)})
    with pytest.raises(Exception, match="model.adapter: .*not a LoRA adapter folder"):
        train(cfg)


def test_grpo_on_smollm2_checkpoints_resumes_evaluates_and_exports(tmp_path, model_cache):
    from mathtune.export import export_run
    from mathtune.model.gguf import read_header

    data = write_jsonl(tmp_path / "math.jsonl", math_records(24))
    settings = {"model.cache_dir": str(model_cache), "data.files": [str(data)], "data.eval_fraction": 0.25,
                "train.method": "grpo", "train.max_steps": 1, "train.save_steps": 1, "train.logging_steps": 1,
                "grpo.num_generations": 2, "grpo.max_completion_length": 12, "eval.max_examples": 2,
                "eval.max_new_tokens": 12, "output.dir": str(tmp_path / "run")}
    train(load_config(overrides=settings, environ={}))
    run = tmp_path / "run"
    resumed = train(load_config(run / "config.yaml", {"train.max_steps": 2}, environ={}), resume=True).summary
    assert resumed["steps"] == 2 and resumed["resumed_from"].endswith("checkpoint-1")
    evaluation = json.loads((run / "eval" / "summary.json").read_text())
    assert set(evaluation["models"]) == {"base", "finetuned"} and evaluation["examples"] == 2

    exported = export_run(run, "gguf-lora")
    assert read_header(exported.path).fields["general.type"] == "adapter"
