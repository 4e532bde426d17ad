"""mathtune/data/dataset.py: chat-template rendering, assistant-only labels (exactly which tokens are
trained), the train/eval split."""

from __future__ import annotations

import pytest

from mathtune.config import DataConfig
from mathtune.data.dataset import DataReport, split_conversations
from mathtune.data.tokenize import (
    IGNORE_INDEX,
    assistant_spans,
    ensure_chat_template,
    tokenize_conversation,
    tokenize_splits,
)
from mathtune.errors import MathtuneError
from tests.conftest import build_chatml_tokenizer, write_jsonl

CONVERSATION = [
    {"role": "system", "content": "Eres un tutor de matemáticas."},
    {"role": "user", "content": "What is 12 * 7?"},
    {"role": "assistant", "content": "12 * 7 = 84."},
    {"role": "user", "content": "¿Y 3/4 + 1/8?"},
    {"role": "assistant", "content": "La respuesta es \\boxed{\\frac{7}{8}}."},
]


def build_datasets(cfg: DataConfig, tokenizer, seed: int):
    """What train.setup does with the data: split the records (checked), then tokenize both parts."""
    report = DataReport()
    train_conv, eval_conv = split_conversations(cfg, seed, report)
    return (*tokenize_splits(train_conv, eval_conv, tokenizer, cfg, report), report)


def trained_text(tokenizer, row) -> list[str]:
    """The trained tokens decoded, one string per contiguous run of labels."""
    runs, current = [], []
    for label in row["labels"]:
        if label == IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(label)
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_chatml_multi_turn_labels_are_exactly_the_assistant_turns_with_end_of_turn(chatml_tokenizer):
    tok = chatml_tokenizer
    row = tokenize_conversation(CONVERSATION, tok, max_seq_length=1024)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id == tok.eos_token_id == im_end  # the SmolLM2 trap

    assert trained_text(tok, row) == ["12 * 7 = 84.<|im_end|>", "La respuesta es \\boxed{\\frac{7}{8}}.<|im_end|>"]
    # Exact ids: the assistant content tokens followed by <|im_end|>, nothing of the prompt.
    first = tok("12 * 7 = 84.", add_special_tokens=False)["input_ids"] + [im_end]
    trained = [i for i in row["labels"] if i != IGNORE_INDEX]
    assert trained[: len(first)] == first
    # Every <|im_end|> that closes an assistant turn is trained; those closing system/user turns are not.
    ends = [i for i, t in enumerate(row["input_ids"]) if t == im_end]
    assert [row["labels"][i] == im_end for i in ends] == [False, False, True, False, True]
    # Labels align with inputs position by position (the model shifts them itself).
    assert all(label in (IGNORE_INDEX, tid) for label, tid in zip(row["labels"], row["input_ids"]))
    assert row["truncated"] is False


def test_newline_after_end_of_turn_and_generation_prompt_are_not_trained(chatml_tokenizer):
    text = chatml_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    spans = assistant_spans(CONVERSATION, chatml_tokenizer, text)
    assert [text[a:b] for a, b in spans] == [
        "12 * 7 = 84.<|im_end|>",
        "La respuesta es \\boxed{\\frac{7}{8}}.<|im_end|>",
    ]
    assert text[spans[0][0] - len("<|im_start|>assistant\n") : spans[0][0]] == "<|im_start|>assistant\n"


def test_train_on_inputs_trains_every_token(chatml_tokenizer):
    row = tokenize_conversation(CONVERSATION, chatml_tokenizer, max_seq_length=1024, train_on_inputs=True)
    assert row["labels"] == row["input_ids"]


def test_truncation_keeps_the_first_tokens_and_says_so(chatml_tokenizer):
    full = tokenize_conversation(CONVERSATION, chatml_tokenizer, max_seq_length=1024)
    cut = tokenize_conversation(CONVERSATION, chatml_tokenizer, max_seq_length=20)
    assert cut["truncated"] is True
    assert cut["input_ids"] == full["input_ids"][:20] and cut["labels"] == full["labels"][:20]


def test_template_that_rewrites_earlier_turns_falls_back_to_content_search():
    # Mistral-style: the system prompt goes into the LAST user turn, so prefixes of the rendering
    # are not prefixes of the full text.
    tok = build_chatml_tokenizer()
    tok.chat_template = (
        "{{ bos_token }}{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
        "{% set loop_messages = messages[1:] if system else messages %}"
        "{% for m in loop_messages %}{% if m['role'] == 'user' %}[INST] "
        "{% if loop.index0 == loop_messages|length - 2 and system %}{{ system }}\n\n{% endif %}{{ m['content'] }}[/INST]"
        "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    )
    row = tokenize_conversation(CONVERSATION, tok, max_seq_length=1024)
    assert trained_text(tok, row) == ["12 * 7 = 84.<|im_end|>", "La respuesta es \\boxed{\\frac{7}{8}}.<|im_end|>"]


def test_missing_template_needs_a_configured_fallback():
    tok = build_chatml_tokenizer()
    tok.chat_template = None
    with pytest.raises(MathtuneError, match="model.chat_template"):
        ensure_chat_template(tok, None)
    ensure_chat_template(tok, "plain")
    row = tokenize_conversation(CONVERSATION[1:3], tok, max_seq_length=256)
    # The plain template ends answers with EOS so a base model learns to stop.
    assert trained_text(tok, row) == ["12 * 7 = 84.<|im_end|>"]


def test_build_datasets_splits_by_seed_and_drops_examples_without_labels(tmp_path, chatml_tokenizer):
    short = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(40)]
    long_prompt = [{"question": "x " * 300, "answer": "too late"}]  # the answer is cut off
    path = write_jsonl(tmp_path / "d.jsonl", short + long_prompt)
    cfg = DataConfig(files=[path], eval_fraction=0.25, max_seq_length=64)

    train, evaluation, report = build_datasets(cfg, chatml_tokenizer, seed=3)
    again, _, _ = build_datasets(cfg, chatml_tokenizer, seed=3)
    other, _, _ = build_datasets(cfg, chatml_tokenizer, seed=4)

    assert report.records == 41
    assert report.truncated == 1 and report.dropped_no_labels == 1
    assert len(train) + len(evaluation) == 40 and len(evaluation) in (10, 11)
    assert train["input_ids"] == again["input_ids"]
    assert train["input_ids"] != other["input_ids"]
    assert set(train.column_names) == {"input_ids", "labels"}


def test_explicit_eval_file_is_used_whole(tmp_path, chatml_tokenizer):
    train_file = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(6)])
    eval_file = write_jsonl(tmp_path / "e.jsonl", [{"query": f"q{i}", "response": f"r{i}"} for i in range(3)])
    cfg = DataConfig(files=[train_file], eval_files=[eval_file])
    train, evaluation, report = build_datasets(cfg, chatml_tokenizer, seed=0)
    assert (len(train), len(evaluation)) == (6, 3)
    assert isinstance(report, DataReport) and report.files[str(eval_file)] == "query_response"


def test_system_prompt_is_added_only_where_a_conversation_has_none(tmp_path):
    from mathtune.data.dataset import load_conversations

    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "2+2?", "output": "4"},
        {"instruction": "3+3?", "output": "6", "system": "Own system."},
    ])
    rows = load_conversations([path], DataConfig(files=[path], system_prompt="Eres un tutor."), DataReport())
    assert [r["messages"][0] for r in rows] == [
        {"role": "system", "content": "Eres un tutor."},
        {"role": "system", "content": "Own system."},
    ]


def test_the_readme_spanish_example_file_loads(tmp_path):
    import re

    from mathtune.data.dataset import load_conversations
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    example = re.search(r"```json\n(.*?)```", readme.split("Guía rápida")[1], re.S).group(1)
    path = tmp_path / "mis_problemas.json"
    path.write_text(example, encoding="utf-8")
    report = DataReport()
    rows = load_conversations([path], DataConfig(files=[path]), report)
    assert len(rows) == 2 and report.files[str(path)] == "alpaca"
    assert rows[0]["messages"][1]["content"].endswith("\\boxed{6x}.")
