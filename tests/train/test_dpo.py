"""DPO (train.method: dpo): preference files routed to it, the pairs it reads, and a whole run."""

from __future__ import annotations

import json

import pytest

from mathtune.cli import main
from mathtune.config import load_config
from mathtune.data.dataset import split_conversations
from mathtune.errors import ConfigError, DataError
from mathtune.train.dpo import dpo_pairs, split_pair
from mathtune.train.recipe import train
from tests.conftest import write_jsonl


def preference_records(n: int = 16) -> list[dict]:
    """Pairs in TRL's two shapes: text fields, and message lists that share the prompt."""
    records = []
    for a in range(1, n + 1):
        right, wrong = f"{a} + {a} = {2 * a}. \\boxed{{{2 * a}}}", f"{a} + {a} = {2 * a + 1}. \\boxed{{{2 * a + 1}}}"
        if a % 2:
            records.append({"prompt": f"¿Cuánto es {a} + {a}?", "chosen": right, "rejected": wrong})
        else:
            user = {"role": "user", "content": f"What is {a} + {a}?"}
            records.append({"chosen": [user, {"role": "assistant", "content": right}],
                            "rejected": [user, {"role": "assistant", "content": wrong}]})
    return records


def test_a_pair_is_the_shared_prompt_then_each_answer():
    system = {"role": "system", "content": "Responde con \\boxed{}."}
    user = {"role": "user", "content": "¿7·8?"}
    chosen, rejected = {"role": "assistant", "content": "\\boxed{56}"}, {"role": "assistant", "content": "\\boxed{54}"}
    assert split_pair([system, user, chosen], [system, user, rejected]) == {
        "prompt": [system, user], "chosen": [chosen], "rejected": [rejected]}
    # Identical answers still leave the answer out of the prompt.
    assert split_pair([user, chosen], [user, chosen])["prompt"] == [user]
    with pytest.raises(Exception, match="share no prompt"):
        split_pair([user, chosen], [{"role": "user", "content": "otra"}, rejected])


def test_a_preference_file_is_routed_to_dpo(tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pares.jsonl", preference_records(4))
    # SFT refuses it and names the method that learns from it.
    with pytest.raises(DataError, match="--method dpo"):
        split_conversations(load_config(overrides={"data.files": [str(pairs)]}, environ={}).data, 42)
    # `data check` says what it is fit for.
    assert main(["data", "check", str(pairs)]) == 0
    out = capsys.readouterr().out
    assert "fit for: dpo (4 pairs), sft on the chosen answers (data.preference: chosen)" in out
    assert "training on the chosen answers" not in out  # checking is not training
    # DPO reads both sides.
    cfg = load_config(overrides={"data.files": [str(pairs)], "train.method": "dpo", "data.preference": "pairs"}, environ={}).data
    train_conv, eval_conv = split_conversations(cfg, 42)
    rows = dpo_pairs(train_conv, "train")
    assert len(rows) + len(eval_conv) == 4
    assert all(r["chosen"][0]["content"] != r["rejected"][0]["content"] for r in rows)
    assert all(r["prompt"][-1]["role"] == "user" for r in rows)


def test_data_check_names_grpo_for_checkable_problems(tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "math.jsonl", [
        {"instruction": "2+2?", "output": "\\boxed{4}"}, {"instruction": "¿Qué es un vector?", "output": "Una flecha."}])
    main(["data", "check", str(pairs), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["files"][0]["fit_for"] == "sft, grpo (1 of 2 with a checkable final answer)"


def test_dpo_refuses_what_is_not_a_pair_and_a_contradicting_setting(tmp_path):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [*preference_records(2), {"instruction": "2+2?", "output": "4"}])
    cfg = load_config(overrides={"data.files": [str(mixed)], "train.method": "dpo", "data.preference": "pairs"}, environ={})
    with pytest.raises(DataError, match="mixed.jsonl:3: chosen: missing .*a preference pair has chosen and rejected"):
        split_conversations(cfg.data, 42)
    with pytest.raises(ConfigError, match="data.preference: 'chosen' trains by SFT"):
        load_config(overrides={"train.method": "dpo", "data.preference": "chosen"}, environ={})
    with pytest.raises(ConfigError, match="plain text"):
        load_config(overrides={"train.method": "grpo", "data.format": "text"}, environ={})


def dpo_config(tmp_path, model_dir, **settings):
    pairs = write_jsonl(tmp_path / "pares.jsonl", preference_records(16))
    overrides = {
        "model.path": str(model_dir), "data.files": [str(pairs)], "data.eval_fraction": 0.25, "train.method": "dpo",
        "lora.r": 4, "lora.alpha": 8, "train.max_steps": 2, "train.batch_size": 4, "train.logging_steps": 1,
        "train.save_steps": 2, "dpo.learning_rate": 1e-2, "eval.max_examples": 2, "eval.max_new_tokens": 4,
        "output.dir": str(tmp_path / "run"), **settings,
    }
    return load_config(overrides=overrides, environ={})


def test_a_dpo_run_learns_the_preference_logs_it_and_resumes(tmp_path, tiny_llama_dir):
    cfg = dpo_config(tmp_path, tiny_llama_dir, **{"train.max_steps": 8, "train.save_steps": 4})
    summary = train(cfg).summary
    run = tmp_path / "run"

    assert summary["method"] == "dpo" and summary["steps"] == 8
    assert summary["train_examples"] == 12 and summary["eval_examples"] == 4
    # The held-out pairs' DPO loss falls from ln 2 (the adapter starts as the reference).
    assert summary["eval_loss_before"] == pytest.approx(0.6931, abs=1e-3)
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "loss" in line]
    assert all(k in steps[0] for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"))
    assert steps[-1]["rewards/margins"] > 0
    assert load_config(run / "config.yaml", environ={}).data.preference == "pairs"
    assert not (run / "adapter" / "ref").exists()
    assert (run / "eval" / "summary.json").is_file()  # verified accuracy of the chosen answers' problems

    resumed = train(load_config(run / "config.yaml", {"train.max_steps": 10}, environ={}), resume=True).summary
    assert resumed["steps"] == 10 and resumed["resumed_from"].endswith("checkpoint-8")


def test_pairs_are_for_dpo_only():
    with pytest.raises(ConfigError, match="data.preference: 'pairs' is for train.method: dpo"):
        load_config(overrides={"data.preference": "pairs"}, environ={})


def test_dpo_on_smollm2_checkpoints_resumes_and_exports(tmp_path, model_cache):
    from mathtune.export import export_run
    from mathtune.model.gguf import read_header

    cfg = dpo_config(tmp_path, None, **{"model.path": None, "model.cache_dir": str(model_cache), "train.max_steps": 1,
                                        "train.save_steps": 1, "train.batch_size": 2, "dpo.learning_rate": 5e-5})
    train(cfg)
    run = tmp_path / "run"
    resumed = train(load_config(run / "config.yaml", {"train.max_steps": 2}, environ={}), resume=True).summary
    assert resumed["steps"] == 2 and resumed["resumed_from"].endswith("checkpoint-1")
    assert resumed["eval_loss_after"] is not None

    exported = export_run(run, "gguf-lora")
    assert read_header(exported.path).fields["general.type"] == "adapter"
