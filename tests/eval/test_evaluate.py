"""Evaluation: batched generation, verified scoring, base vs fine-tuned, the files written."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from mathtune.cli import main
from mathtune.config import LoraConfig, ModelConfig
from mathtune.eval.evaluate import (
    BENCHES,
    EvalExample,
    Generated,
    eval_examples,
    generate,
    greedy_answers,
    run_conversations,
    score,
    stop_token_ids,
)
from mathtune.model.load import load_model
from mathtune.train.lora import apply_lora
from tests.train.test_recipe import tiny_run_config


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


def test_the_default_run_scores_its_whole_held_out_split():
    from mathtune.config import Config
    from mathtune.data.dataset import split_conversations

    cfg = Config()
    _, held_out = split_conversations(cfg.data, cfg.train.seed)
    assert len(held_out) == 82 <= cfg.eval.max_examples
    examples = eval_examples(held_out, cfg.eval.max_examples or None)
    assert len(examples) == 82 and sum(e.checkable for e in examples) == 73


def test_eval_and_eval_gguf_choose_the_runs_conversations_by_split_as_training_split_them():
    from mathtune.config import Config
    from mathtune.data.dataset import split_conversations

    cfg = Config()
    train_conv, eval_conv = split_conversations(cfg.data, cfg.train.seed)
    assert list(run_conversations(cfg, "eval")["messages"]) == list(eval_conv["messages"])
    assert list(run_conversations(cfg, "train")["messages"]) == list(train_conv["messages"])
    assert list(run_conversations(cfg, "all")["messages"]) == list(train_conv["messages"]) + list(eval_conv["messages"])


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny_llama_dir):
    model, tokenizer, _ = load_model(ModelConfig(path=str(tiny_llama_dir)))
    model = apply_lora(model, LoraConfig(r=4)).eval()
    prompts = [[{"role": "user", "content": text}] for text in ("What is 12 * 7?", "2+2", "¿Cuánto es 3/4 + 1/8? x")]
    together = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    alone = [generate(model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert together == alone
    assert tokenizer.padding_side == "right"  # restored for training
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_token_ids(tokenizer, model)


def test_rows_that_stopped_leave_the_batch_and_every_answer_is_the_one_call_answer(tiny_llama_dir, monkeypatch):
    """Answers come ANSWER_PIECE tokens at a time, and a row that has stopped leaves the batch (and
    the KV cache); each row still gets the tokens one generate() call over the whole batch gives."""
    import mathtune.eval.evaluate as evaluate

    model, tokenizer, _ = load_model(ModelConfig(path=str(tiny_llama_dir), dtype="float32"))
    model = apply_lora(model, LoraConfig(r=4)).eval()
    tokenizer.padding_side = "left"
    texts = ["What is 12 * 7?", "2+2", "¿Cuánto es 3/4 + 1/8? x", "Solve x^2 = 9 for x, please, step by step."]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    never = [tokenizer.pad_token_id]
    monkeypatch.setattr(evaluate, "ANSWER_PIECE", 12)
    free = greedy_answers(model, enc, never, tokenizer.pad_token_id, max_new_tokens=12)
    # Stop tokens met at different steps: one row stops after 2 tokens, another after 5 (the
    # first token in it that the first row does not say before), the others run to the limit.
    stop = [free[0][1], next(t for t in free[1][4:] if t not in free[0][:2])]
    rows_seen = []
    real_generate = model.generate

    def counting_generate(*args, **kwargs):
        rows_seen.append(kwargs["input_ids"].shape[0])
        return real_generate(*args, **kwargs)

    model.generate = counting_generate
    whole = greedy_answers(model, enc, stop, tokenizer.pad_token_id, max_new_tokens=12)
    assert rows_seen == [4]
    monkeypatch.setattr(evaluate, "ANSWER_PIECE", 3)
    rows_seen.clear()
    pieces = greedy_answers(model, enc, stop, tokenizer.pad_token_id, max_new_tokens=12)
    assert pieces == whole
    assert whole[0] == free[0][:2]  # up to and including its stop token
    assert all(len(ids) == 12 for ids, row in zip(whole, free) if not set(row) & set(stop))
    assert rows_seen[0] == 4 and rows_seen[-1] < 4 and rows_seen == sorted(rows_seen, reverse=True)
    assert len(rows_seen) == 4  # 12 tokens, 3 at a time


def _always_says(model, token_id: int):
    """The model, made to answer `token_id` at every step."""
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[token_id] = 10.0
    model.lm_head = head
    return model


def test_an_answer_that_hits_the_token_limit_is_truncated_not_wrong(tiny_llama_dir, chatml_tokenizer):
    # float32 on every CPU: the test's own head (_always_says) is a float32 layer.
    model, tokenizer, _ = load_model(ModelConfig(path=str(tiny_llama_dir), dtype="float32"))
    prompt = [[{"role": "user", "content": "What is 12 * 7?"}]]
    digit = chatml_tokenizer.convert_tokens_to_ids("7")
    talker = _always_says(model, digit).eval()
    assert generate(talker, tokenizer, prompt, max_new_tokens=5, batch_size=1) == [Generated("77777", True)]
    example = EvalExample(prompt[0], "The answer is \\boxed{84}.", "arithmetic", True)
    [result] = score(talker, tokenizer, [example], max_new_tokens=5, batch_size=1, max_seq_length=64)
    # The verifier's fallback reads 77777 from the cut-off text; no answer was stated, so truncated.
    assert (result["correct"], result["predicted"], result["truncated"]) == (False, "77777", True)
    stopper = _always_says(model, chatml_tokenizer.convert_tokens_to_ids("<|im_end|>")).eval()
    assert generate(stopper, tokenizer, prompt, max_new_tokens=5, batch_size=1) == [Generated("", False)]


def test_training_ends_with_base_vs_finetuned_scores_written_beside_the_run(tmp_path, tiny_llama_dir):
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, max_steps=2, save_steps=2)
    run = tmp_path / "run"
    from mathtune.train.recipe import train

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
    for name in ("finetuned", "base"):
        m = summary["models"][name]
        assert m["correct"] + m["wrong"] + m["truncated"] == m["checked"]
        assert 0 <= m["interval"]["low"] <= m["accuracy"] <= m["interval"]["high"] <= 1
    change = summary["change"]
    assert {"difference", "low", "high", "p_value", "only_base", "only_tuned", "significant", "by_topic"} <= set(change)
    protocol = summary["protocol"]
    assert protocol["decoding"] == "greedy" and protocol["max_new_tokens"] == 6
    assert protocol["stop_tokens"] == ["<|endoftext|>", "<|im_end|>"]
    assert protocol["verifier"].startswith("math-verify 0.") and "zero-shot" in protocol["prompt"]


def test_eval_command_scores_real_gsm8k_lines_with_no_gsm8k_code(tmp_path, tiny_llama_dir, caplog):
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, max_steps=1, save_steps=1)
    from mathtune.train.recipe import train

    train(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"at_end": False})}))
    lines = BENCHES["gsm8k"].file.read_text(encoding="utf-8").splitlines()[:4]
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
    assert re.search(r"topic +n +base +fine-tuned +change \(points\) +p\n", caplog.text)  # the table is printed
    assert "Protocol: the model's chat template" in caplog.text and "at most 4 new tokens" in caplog.text


def test_bench_scores_base_and_finetuned_on_the_shipped_gsm8k_sample(tmp_path, tiny_llama_dir, caplog):
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, max_steps=1, save_steps=1)
    from mathtune.train.recipe import train

    train(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"at_end": False})}))
    caplog.set_level(logging.INFO, logger="mathtune")
    run = tmp_path / "run"
    assert main(["eval", str(run), "--bench", "gsm8k", "--limit", "3", "--max-new-tokens", "4"]) == 0
    summary = json.loads((run / "bench" / "gsm8k" / "summary.json").read_text())
    assert (summary["bench"], summary["examples"], summary["split"]) == ("gsm8k", 3, "test")
    assert set(summary["models"]) == {"base", "finetuned"} and summary["change"]["by_topic"]
    assert summary["protocol"]["max_new_tokens"] == 4
    predictions = [json.loads(line) for line in (run / "bench" / "gsm8k" / "predictions.jsonl").read_text().splitlines()]
    first = json.loads(BENCHES["gsm8k"].file.read_text(encoding="utf-8").splitlines()[0])
    assert predictions[0]["prompt"] == [{"role": "user", "content": first["question"]}]
    assert not (run / "eval").exists()  # the held-out scores are not replaced
    assert "gsm8k: GSM8K test, 300-problem seeded sample" in caplog.text
    assert main(["eval", str(run), "--bench", "gsm8k", "--data", "x.jsonl"]) == 2


def test_eval_bench_runs_after_training_and_a_significant_drop_is_the_last_word(tmp_path, tiny_llama_dir, caplog,
                                                                                monkeypatch):
    import mathtune.eval.accuracy
    from mathtune.train.recipe import train

    seen = []

    def drop_on_gsm8k(summary, what):
        seen.append((what, summary["examples"]))
        return "Fine-tuning made the model worse on gsm8k" if what == "gsm8k" else None

    monkeypatch.setattr(mathtune.eval.accuracy, "significant_drop", drop_on_gsm8k)
    monkeypatch.setattr("mathtune.eval.evaluate.significant_drop", drop_on_gsm8k)
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, max_steps=1, save_steps=1)
    cfg.eval.bench, cfg.eval.bench_limit = ["gsm8k"], 2
    caplog.set_level(logging.INFO, logger="mathtune")
    train(cfg)
    run = tmp_path / "run"
    summary = json.loads((run / "bench" / "gsm8k" / "summary.json").read_text())
    assert summary["examples"] == 2 and set(summary["models"]) == {"base", "finetuned"}
    assert seen == [("the held-out split", 3), ("gsm8k", 2)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["WARNING: Fine-tuning made the model worse on gsm8k"]
    assert 'id="bench-gsm8k"' in (run / "report.html").read_text(encoding="utf-8")


def test_without_eval_bench_training_says_how_to_check_general_math(tmp_path, tiny_llama_dir, caplog):
    from mathtune.train.recipe import train

    caplog.set_level(logging.INFO, logger="mathtune")
    train(tiny_run_config(tmp_path, tiny_llama_dir, max_steps=1, save_steps=1))
    assert f"mathtune eval {tmp_path / 'run'} --bench gsm8k" in caplog.text
    assert not (tmp_path / "run" / "bench").exists()


def test_the_shipped_gsm8k_sample_is_300_test_problems_with_license_and_source():
    bench = BENCHES["gsm8k"]
    lines = bench.file.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 300 and all(set(json.loads(line)) == {"question", "answer"} for line in lines)
    folder = bench.file.parent
    assert "MIT License" in (folder / "LICENSE").read_text() and "Copyright (c) 2021 OpenAI" in (folder / "LICENSE").read_text()
    source = (folder / "SOURCE.md").read_text()
    assert "seed 2021" in source and "openai/grade-school-math" in source
    import hashlib

    assert hashlib.sha256(bench.file.read_bytes()).hexdigest() in source


def test_eval_of_a_folder_that_is_not_a_finished_run(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a finished mathtune run" in capsys.readouterr().err
    assert main(["eval", str(tmp_path), "--limit", "0"]) == 2


def test_reference_loss_is_lower_for_the_model_that_learned_the_reference(tiny_llama_dir):
    from mathtune.eval.evaluate import reference_loss

    model, tokenizer, _ = load_model(ModelConfig(path=str(tiny_llama_dir)))
    model = apply_lora(model, LoraConfig(r=4, alpha=8))
    example = EvalExample([{"role": "user", "content": "¿Qué es un primo?"}], "Un número con dos divisores.", "x", False)
    before = reference_loss(model, tokenizer, example, 256)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    from mathtune.data.tokenize import tokenize_conversation

    row = tokenize_conversation([*example.prompt, {"role": "assistant", "content": example.reference}], tokenizer, 256)
    for _ in range(30):
        model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert reference_loss(model, tokenizer, example, 256) < before - 0.5


def _eval_files(run) -> tuple[list[dict], dict]:
    predictions = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    summary = json.loads((run / "eval" / "summary.json").read_text())
    return predictions, {"models": summary["models"], "change": summary["change"]}


@pytest.mark.parametrize(("units", "dtype"), [("AMX", "bfloat16"), (None, "float32")])
def test_eval_of_a_run_reloads_it_in_its_precision_and_reproduces_the_end_of_training_table(
        tmp_path, tiny_llama_dir, monkeypatch, units, dtype):
    """`mathtune eval RUN --base` on the machine a run trained on gives the table training ended with,
    answer for answer, for a bf16 run (a CPU with bf16 units) and a float32 run (one without)."""
    from mathtune.run import load_run_config
    from mathtune.train.recipe import train

    monkeypatch.setattr("mathtune.hardware.cpu_bf16_units", lambda: units)
    train(tiny_run_config(tmp_path, tiny_llama_dir, max_steps=2, save_steps=2))
    run = tmp_path / "run"
    assert json.loads((run / "train_summary.json").read_text())["dtype"] == dtype
    assert load_run_config(run).model.dtype == dtype
    at_end = _eval_files(run)
    assert main(["eval", str(run), "--base", "--limit", str(len(at_end[0]))]) == 0
    assert _eval_files(run) == at_end


def test_a_run_moved_to_another_cpu_is_reloaded_in_its_own_precision_or_says_why_not(
        tmp_path, tiny_llama_dir, monkeypatch, caplog):
    from mathtune.run import load_run_config
    from mathtune.train.recipe import train

    monkeypatch.setattr("mathtune.hardware.cpu_bf16_units", lambda: None)
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, max_steps=1, save_steps=1)
    train(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"at_end": False})}))
    run = tmp_path / "run"
    # A float32 run stays float32 on a CPU with bf16 units, where auto alone would pick bf16.
    monkeypatch.setattr("mathtune.hardware.cpu_bf16_units", lambda: "AVX512-BF16")
    assert load_run_config(run).model.dtype == "float32"

    # A bf16 run on a CPU without bf16 units: float32, and the log says so.
    summary = json.loads((run / "train_summary.json").read_text())
    del summary["dtype"]  # as a run from before the field: read from "precision"
    summary["precision"] = "bf16 autocast, bfloat16 weights"
    (run / "train_summary.json").write_text(json.dumps(summary))
    monkeypatch.setattr("mathtune.hardware.cpu_bf16_units", lambda: "AMX")
    assert load_run_config(run).model.dtype == "bfloat16"
    monkeypatch.setattr("mathtune.hardware.cpu_bf16_units", lambda: None)
    caplog.set_level(logging.WARNING, logger="mathtune")
    assert load_run_config(run).model.dtype == "float32"
    assert "trained in bfloat16; this CPU has no bf16 units, so the base is loaded in float32" in caplog.text
    # A setting of the run's own is kept as it was.
    config = (run / "config.yaml").read_text().replace("dtype: auto", "dtype: float32")
    (run / "config.yaml").write_text(config)
    monkeypatch.setattr("mathtune.hardware.cpu_bf16_units", lambda: "AMX")
    assert load_run_config(run).model.dtype == "float32"


def test_the_finetuned_answers_come_from_a_merged_copy_and_the_model_is_left_untouched(tiny_llama_dir, tmp_path):
    """evaluate_model scores the fine-tuned model as one merged copy (PEFT's merge, as the exports
    merge it): the answers of merge_and_unload, the run's own weights bit for bit as they were, and
    the protocol says so. Without a copy (a 4-bit base, several adapters) the adapter runs on the fly."""
    import copy

    from mathtune.eval.evaluate import MERGED_NOTE, evaluate_model, merged_copy

    model, tokenizer, _ = load_model(ModelConfig(path=str(tiny_llama_dir)))
    model = apply_lora(model, LoraConfig(r=4, alpha=8))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # an adapter that changes the answers
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    examples = eval_examples([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "\\boxed{4}"}]}
                              for q in ("2+2", "What is 12 * 7?", "3 + 1")])
    summary = evaluate_model(model, tokenizer, examples, tmp_path / "eval", base=True, max_new_tokens=6,
                             batch_size=3, max_seq_length=64)
    merged = copy.deepcopy(model).merge_and_unload().eval()
    want = [g.text for g in generate(merged, tokenizer, [e.prompt for e in examples], max_new_tokens=6, batch_size=3)]
    got = [json.loads(line)["finetuned"]["response"] for line in (tmp_path / "eval" / "predictions.jsonl").open()]
    assert got == want
    assert summary["protocol"]["finetuned_model"] == MERGED_NOTE
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)

    model.add_adapter("other", model.peft_config["default"])
    with merged_copy(model) as tuned:
        assert tuned is model
