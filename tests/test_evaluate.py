"""Evaluation: batched generation, verified scoring, base vs fine-tuned, the files written."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from mathtune.cli import main
from mathtune.config import LoraConfig, ModelConfig
from mathtune.evaluate import (
    EvalExample,
    comparison_table,
    eval_examples,
    generate,
    stop_token_ids,
    summarize,
)
from mathtune.lora import apply_lora
from mathtune.model import load_model
from tests.conftest import GSM8K
from tests.test_train import tiny_run_config


def test_the_last_assistant_turn_is_the_reference_and_concepts_are_not_checkable():
    rows = [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "\\boxed{4}"},
                      {"role": "user", "content": "Y el doble?"}, {"role": "assistant", "content": "La respuesta es 8."}],
         "topic": "arithmetic"},
        {"messages": [{"role": "user", "content": "¿Qué es un primo?"},
                      {"role": "assistant", "content": "Un número con dos divisores."}], "topic": None},
    ]
    first, concept = eval_examples(rows)
    assert first.prompt == rows[0]["messages"][:3] and first.reference == "La respuesta es 8." and first.checkable
    # No topic field: the detected one ("primo" is divisibility vocabulary).
    assert concept.topic == "divisibility" and not concept.checkable
    assert len(eval_examples(rows, limit=1)) == 1


def test_accuracy_counts_only_checkable_examples_overall_and_per_topic():
    examples = [EvalExample([], "\\boxed{1}", "a", True), EvalExample([], "\\boxed{2}", "a", True),
                EvalExample([], "\\boxed{3}", "b", True), EvalExample([], "explanation", "b", False)]
    results = [{"correct": True}, {"correct": False}, {"correct": True}, {"reference_loss": 1.0}]
    summary = summarize(examples, results)
    assert (summary["accuracy"], summary["correct"], summary["checked"]) == (0.6667, 2, 3)
    assert summary["by_topic"] == {"a": {"accuracy": 0.5, "correct": 1, "checked": 2},
                                   "b": {"accuracy": 1.0, "correct": 1, "checked": 1}}
    assert summary["uncheckable"] == 1 and summary["reference_loss"] == 1.0
    assert summary["reference_perplexity"] == pytest.approx(2.7183, abs=1e-4)

    table = comparison_table({"models": {"finetuned": summary, "base": {**summary, "accuracy": 0.3333,
                                                                         "by_topic": summary["by_topic"]}}})
    assert "all" in table and "+33.3" in table and "66.7%" in table


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny_llama_dir):
    model, tokenizer, _ = load_model(ModelConfig(path=str(tiny_llama_dir)))
    model = apply_lora(model, LoraConfig(r=4)).eval()
    prompts = [[{"role": "user", "content": text}] for text in ("What is 12 * 7?", "2+2", "¿Cuánto es 3/4 + 1/8? x")]
    together = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    alone = [generate(model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert together == alone
    assert tokenizer.padding_side == "right"  # restored for training
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer, model)


def test_training_ends_with_base_vs_finetuned_scores_written_beside_the_run(tmp_path, tiny_llama_dir):
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, max_steps=2, save_steps=2)
    run = tmp_path / "run"
    from mathtune.train import train

    train(cfg)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    predictions = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert summary["examples"] == len(predictions) == 3  # eval.max_examples
    assert set(summary["models"]) == {"finetuned", "base"}
    for name in ("finetuned", "base"):
        correct = sum(p[name]["correct"] for p in predictions if p["checkable"])
        assert summary["models"][name]["correct"] == correct
        assert all({"response", "predicted", "expected", "correct", "reason"} <= set(p[name]) for p in predictions)
    assert all(p["reference"] and p["prompt"][-1]["role"] == "user" for p in predictions)


def test_eval_command_scores_real_gsm8k_lines_with_no_gsm8k_code(tmp_path, tiny_llama_dir, caplog):
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, max_steps=1, save_steps=1)
    from mathtune.train import train

    train(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"at_end": False})}))
    lines = (GSM8K / "test.jsonl").read_text(encoding="utf-8").splitlines()[:4]
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")

    caplog.set_level(logging.INFO, logger="mathtune")
    code = main(["eval", str(tmp_path / "run"), "--data", str(data), "--base", "--max-new-tokens", "4",
                 "--batch-size", "2"])
    assert code == 0
    summary = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    assert summary["examples"] == 4 and summary["split"] == "all"
    assert summary["models"]["base"]["checked"] == summary["models"]["finetuned"]["checked"] == 4
    predictions = [json.loads(line) for line in (tmp_path / "run" / "eval" / "predictions.jsonl").read_text().splitlines()]
    expected = [json.loads(line)["answer"].rsplit("####", 1)[1].strip() for line in lines]
    assert [p["finetuned"]["expected"] for p in predictions] == expected
    assert "base  fine-tuned  change" in caplog.text  # the comparison table is printed


def test_eval_of_a_folder_that_is_not_a_finished_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a finished mathtune run" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--limit", "0"]) == 2


def test_reference_loss_is_lower_for_the_model_that_learned_the_reference(tiny_llama_dir):
    from mathtune.evaluate import reference_loss

    model, tokenizer, _ = load_model(ModelConfig(path=str(tiny_llama_dir)))
    model = apply_lora(model, LoraConfig(r=4, alpha=8))
    example = EvalExample([{"role": "user", "content": "¿Qué es un primo?"}], "Un número con dos divisores.", "x", False)
    before = reference_loss(model, tokenizer, example, 256)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    from mathtune.data.dataset import tokenize_conversation

    row = tokenize_conversation([*example.prompt, {"role": "assistant", "content": example.reference}], tokenizer, 256)
    for _ in range(30):
        model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert reference_loss(model, tokenizer, example, 256) < before - 0.5
