"""Plain text (data.format: text): documents from {"text": ...} records and .txt/.md files, packed into
data.max_seq_length chunks with the end-of-text token between documents, every token trained; a short
training run reports held-out loss and perplexity instead of verified accuracy."""

from __future__ import annotations

import json
import logging

import pytest

from mathtune.cli import main
from mathtune.config import DataConfig, load_config
from mathtune.data.dataset import DataReport, iter_conversations, load_conversations
from mathtune.data.formats import Document, detect_format
from mathtune.data.readers import read_records
from mathtune.data.stats import dataset_stats
from mathtune.data.tokenize import pack_documents
from mathtune.errors import DataError
from tests.conftest import write_jsonl
from tests.data.test_dataset import build_datasets

NOTES = """# Fracciones

Una fracción representa partes de un todo: en 3/4, el denominador 4 dice en cuántas partes
iguales se divide, y el numerador 3 cuántas se toman.

A fraction is equivalent to another when both sides are multiplied by the same number: 3/4 = 6/8.

Para sumar fracciones con distinto denominador, se busca un denominador común.
"""


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def test_text_records_are_detected_and_files_are_documents_per_file_or_per_block(tmp_path):
    assert detect_format({"text": "La derivada de x^2 es 2x."}) == "text"
    path = tmp_path / "notas.md"
    path.write_text(NOTES, encoding="utf-8")
    ((place, doc, fmt),) = iter_conversations(path)
    assert (place, fmt, doc) == (str(path), "text", Document(NOTES.strip()))
    blocks = list(iter_conversations(path, DataConfig(documents="blocks")))
    assert [place for place, _, _ in blocks] == [f"{path}:{line}" for line in (1, 3, 6, 8)]
    assert blocks[1][1].text.startswith("Una fracción") and blocks[1][1].text.endswith("cuántas se toman.")


def test_text_problems_are_named(tmp_path):
    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": "Una fracción ..."}, {"text": ""}, {"text": 3}])
    assert [str(conv) for _, conv, _ in iter_conversations(path)][1:] == ["text: is empty", "text: expected text, got a number"]
    empty = tmp_path / "vacio.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match="vacio.txt: the file is empty; expected plain text"):
        list(read_records(empty))
    notes = tmp_path / "notas.txt"
    notes.write_text(NOTES, encoding="utf-8")
    with pytest.raises(DataError, match="a plain-text file, but data.format is 'messages'"):
        list(iter_conversations(notes, DataConfig(format="messages")))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"question": "2+2?", "answer": "4"}])
    with pytest.raises(DataError, match="plain text .* and conversations .* in one run"):
        load_conversations([notes, pairs], DataConfig(), DataReport())


def test_documents_are_packed_with_eos_between_them_and_every_token_trained(chatml_tokenizer):
    import datasets

    docs = ["Una fracción es parte de un todo. " * 3, "The derivative of x^2 is 2x.", "3/4 = 6/8."]
    chunks = pack_documents(datasets.Dataset.from_dict({"text": docs, "topic": [None] * 3}), chatml_tokenizer, 16)
    eos = chatml_tokenizer.eos_token_id
    stream = []
    for doc in docs:
        stream += chatml_tokenizer(doc)["input_ids"] + [eos]
    assert [len(row["input_ids"]) for row in chunks][:-1] == [16] * (len(chunks) - 1)
    assert 1 < len(chunks[-1]["input_ids"]) <= 16
    assert [t for row in chunks for t in row["input_ids"]] == stream  # nothing lost, EOS after each document
    assert stream.count(eos) == 3
    assert all(row["labels"] == row["input_ids"] for row in chunks)


def test_stats_count_document_tokens_as_packing_does(tmp_path, chatml_tokenizer, capsys):
    path = tmp_path / "notas.md"
    path.write_text(NOTES, encoding="utf-8")
    cfg = DataConfig(documents="blocks", max_seq_length=32)
    stats = dataset_stats([path], chatml_tokenizer, cfg)
    docs = [conv.text for _, conv, _ in iter_conversations(path, cfg)]
    packed = sum(len(chatml_tokenizer(d)["input_ids"]) + 1 for d in docs)
    assert sum(v * c for v, c in stats.tokens.counts.items()) == packed
    d = stats.to_dict()
    assert d["shapes"] == {"text": {"records": 4, "turns": 0}} and d["languages"]["es"] == 2
    assert d["lengths"]["document_words"]["count"] == 4 and d["lengths"]["question_words"] is None
    assert main(["data", "stats", str(path), "--set", "data.documents=blocks"]) == 0
    out = capsys.readouterr().out
    assert "document words" in out and "checkable final answers" not in out


def test_build_datasets_packs_train_and_eval_documents(tmp_path, chatml_tokenizer):
    docs = [{"text": f"Fracción {i}/{i + 1}: parte de un todo. The derivative of x^{i} is {i}x^{i - 1}."} for i in range(2, 22)]
    path = write_jsonl(tmp_path / "corpus.jsonl", docs)
    train, evaluation, report = build_datasets(DataConfig(files=[path], max_seq_length=24), chatml_tokenizer, seed=0)
    assert report.text and report.files == {str(path): "text"}
    assert report.train_tokens == report.train_label_tokens == sum(len(row["input_ids"]) for row in train)
    assert max(len(row["input_ids"]) for row in train) == 24
    assert len(evaluation) > 0
    assert any("train / " in line and "chunks" in line for line in report.lines())


def test_a_short_training_run_on_text_reports_loss_and_perplexity(tmp_path, tiny_llama_dir, caplog):
    from mathtune.eval.evaluate import evaluate_run
    from mathtune.train.recipe import train

    path = tmp_path / "apuntes.md"
    path.write_text("\n\n".join(f"Una fracción {i}/{i + 1} representa partes de un todo. The derivative of x^{i} "
                                f"is {i}x^{i - 1}." for i in range(2, 26)), encoding="utf-8")
    overrides = {"model.path": str(tiny_llama_dir), "data.files": [str(path)], "data.documents": "blocks",
                 "data.max_seq_length": 48, "data.eval_fraction": 0.25, "lora.r": 4, "train.max_steps": 4,
                 "train.batch_size": 2, "train.learning_rate": 1e-2, "train.logging_steps": 1,
                 "output.dir": str(tmp_path / "run")}
    with caplog.at_level(logging.INFO, logger="mathtune"):
        summary = train(load_config(overrides=overrides, environ={})).summary
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["eval_perplexity_after"] == pytest.approx(2.718281828 ** summary["eval_loss_after"], rel=1e-3)
    assert "verified-accuracy evaluation is skipped" in caplog.text
    assert not (tmp_path / "run" / "eval" / "summary.json").exists()

    result = evaluate_run(tmp_path / "run", base=True)
    written = json.loads((tmp_path / "run" / "eval" / "perplexity.json").read_text())
    assert written == result and written["documents"] == 6
    tuned, base = written["models"]["finetuned"], written["models"]["base"]
    assert tuned["loss"] == pytest.approx(summary["eval_loss_after"], abs=0.02)
    assert base["loss"] == pytest.approx(summary["eval_loss_before"], abs=0.02)
    assert tuned["perplexity"] < base["perplexity"]


def test_check_stats_and_training_agree_on_text(tmp_path):
    from mathtune.data.check import check_files

    path = write_jsonl(tmp_path / "corpus.jsonl", [{"text": NOTES}, {"text": ""}, {"text": "La derivada de x^2 es 2x.",
                                                                                    "label": False}])
    cfg = DataConfig(on_invalid="skip")
    checked = check_files([path], lambda *_: None, cfg).files[0]
    stats = dataset_stats([path], cfg=cfg)
    report = DataReport()
    loaded = load_conversations([path], cfg, report)
    assert (checked.records, checked.invalid, checked.skipped) == (stats.records, stats.invalid, stats.skipped) == (
        report.records, report.skipped_invalid, report.skipped_undesirable) == (3, 1, 1)
    assert list(loaded) == [{"text": NOTES, "topic": None}]
