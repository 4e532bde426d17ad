"""The data people already have: content parts, CSV/TSV/Parquet, wrappers, preference pairs, KTO labels,
images and tools. Each shape is written as a real-looking file (English and Spanish) and goes through
`data check`, `data stats` and the training loader, which must agree: they share one parser."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mathtune.cli import main
from mathtune.config import DataConfig
from mathtune.data.check import check_files
from mathtune.data.dataset import DataReport, Skipped, iter_conversations, load_conversations
from mathtune.data.formats import RecordError, detect_format, parse_record
from mathtune.data.readers import read_records
from mathtune.data.stats import dataset_stats
from mathtune.errors import DataError
from tests.conftest import write_jsonl
from tests.data.test_dataset import build_datasets

Q_ES, A_ES = "¿Cuánto es 3/4 + 1/8?", "Sumamos: 6/8 + 1/8 = 7/8. La respuesta es \\boxed{\\frac{7}{8}}."
Q_EN, A_EN = "What is 12 * 7?", "12 * 7 = 84. The answer is \\boxed{84}."
SPANISH_FIELDS = {"format": "fields", "fields": {"prompt": "pregunta", "response": "respuesta"}}


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def chat(*turns, parts=False):
    """messages from alternating user/assistant texts, optionally as OpenAI content parts."""
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": [{"type": "text", "text": t}] if parts else t} for i, t in enumerate(turns)]


def problems_of(path: Path, **cfg) -> list[tuple[str, str]]:
    found = []
    check_files([path], lambda place, message: found.append((place, message)), DataConfig(**cfg))
    return found


# ---------------------------------------------------------------------------------------------
# OpenAI content parts


def test_text_parts_are_joined_in_order():
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": Q_ES},
                                                         {"type": "text", "text": "Simplifica."}]},
                           {"role": "assistant", "content": [{"type": "text", "text": A_ES}]}]}
    assert parse_record(record, "messages").messages == [
        {"role": "user", "content": f"{Q_ES}\nSimplifica."}, {"role": "assistant", "content": A_ES}]


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "triangulo.png"}},
                                  {"type": "input_audio", "input_audio": {"data": "...", "format": "wav"}}])
def test_a_non_text_part_is_refused_with_its_place(part):
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "¿Qué figura es?"}, part]},
                           {"role": "assistant", "content": "Un triángulo."}]}
    with pytest.raises(RecordError) as excinfo:
        parse_record(record, "messages")
    assert excinfo.value.field == "messages[0].content[1].type"
    assert f"'{part['type']}' parts are not supported" in str(excinfo.value)
    assert "data.on_invalid: skip" in str(excinfo.value)


# ---------------------------------------------------------------------------------------------
# What supervised fine-tuning cannot use: images, tools


UNSUPPORTED = [
    ({"messages": [*chat("2+2?"), {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
                   {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4"}]}, "messages[1].tool_calls"),
    ({"messages": [*chat("2+2?", "Calculo."), {"role": "tool", "content": "4"}]}, "messages[2].role"),
    ({"conversations": [{"from": "human", "value": "¿Cuánto es 2^10?"}, {"from": "function_call", "value": "{}"},
                        {"from": "observation", "value": "1024"}, {"from": "gpt", "value": "1024"}]},
     "conversations[1].from"),
    ({"conversations": [{"from": "human", "value": "<image>¿Qué ángulo es?"}, {"from": "gpt", "value": "90°"}]},
     "conversations[0].value"),
    ({"messages": chat("What is the area?", "12 cm²"), "images": ["rectangle.png"]}, "images"),
    ({"messages": chat("¿Cuánto es 7·8?", "56"), "tools": [{"type": "function", "function": {"name": "calc"}}]},
     "tools"),
]


@pytest.mark.parametrize(("record", "place"), UNSUPPORTED, ids=["tool_calls", "tool role", "sharegpt function_call",
                                                               "<image>", "images key", "tool definitions"])
def test_images_and_tools_are_named_as_unsupported(record, place):
    with pytest.raises(RecordError) as excinfo:
        parse_record(record, detect_format(record))
    assert excinfo.value.field == place
    assert "not supported" in str(excinfo.value) and "data.on_invalid: skip" in str(excinfo.value)


def test_with_skip_a_conversation_with_a_tool_turn_is_left_out_whole(tmp_path):
    good = {"messages": chat(Q_ES, A_ES, "¿Y 1/2 + 1/4?", "3/4")}
    path = write_jsonl(tmp_path / "agent.jsonl", [good, UNSUPPORTED[0][0], {"messages": chat(Q_EN, A_EN, parts=True)}])
    report = DataReport()
    ds = load_conversations([path], DataConfig(on_invalid="skip"), report)
    # The tool conversation is gone entirely: no turn of it was dropped from inside a kept conversation.
    assert [len(row["messages"]) for row in ds] == [4, 2]
    assert report.skipped_invalid == 1


# ---------------------------------------------------------------------------------------------
# Preference pairs


PREFERENCE = {
    "trl standard": {"prompt": Q_ES, "chosen": A_ES, "rejected": "7/12"},
    "alpaca": {"instruction": "Suma las fracciones.", "input": "3/4 + 1/8", "chosen": A_ES, "rejected": "4/12"},
    "trl conversational": {"chosen": chat(Q_ES, A_ES), "rejected": chat(Q_ES, "4/12")},
    "trl explicit prompt": {"prompt": chat(Q_ES), "chosen": [{"role": "assistant", "content": A_ES}],
                            "rejected": [{"role": "assistant", "content": "4/12"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": Q_ES}], "chosen": {"from": "gpt", "value": A_ES},
                 "rejected": {"from": "gpt", "value": "4/12"}},
}


@pytest.mark.parametrize("variant", sorted(PREFERENCE))
def test_preference_variants_are_read_as_prompt_and_chosen_answer(variant):
    record = PREFERENCE[variant]
    assert detect_format(record) == "preference"
    messages = parse_record(record, "preference").messages
    assert messages[-1] == {"role": "assistant", "content": A_ES}
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert "4/12" not in json.dumps(messages) and "7/12" not in json.dumps(messages)
    rejected = parse_record(record, "preference").rejected  # the same prompt with the rejected answer (DPO)
    assert rejected[:-1] == messages[:-1] and rejected[-1]["role"] == "assistant"
    assert rejected[-1]["content"] in ("4/12", "7/12")


def test_preference_data_is_refused_unless_the_chosen_side_is_asked_for(tmp_path, capsys):
    path = write_jsonl(tmp_path / "dpo.jsonl", [PREFERENCE["trl standard"], {"prompt": Q_EN, "chosen": A_EN, "rejected": "74"}])
    with pytest.raises(DataError) as excinfo:
        load_conversations([path], DataConfig(), DataReport())
    assert f"{path}:1: preference data (chosen/rejected pairs" in str(excinfo.value)
    assert "data.preference: chosen" in str(excinfo.value) and "--method dpo" in str(excinfo.value)
    assert main(["data", "check", str(path)]) == 0  # checking reads the pairs whatever the method
    assert "fit for: dpo (2 pairs), sft on the chosen answers (data.preference: chosen)" in capsys.readouterr().out

    report = DataReport()
    ds = load_conversations([path], DataConfig(preference="chosen"), report)
    assert [row["messages"][-1]["content"] for row in ds] == [A_ES, A_EN]
    assert report.files == {str(path): "preference"}
    assert any("training on the chosen answers" in line for line in report.lines())
    assert main(["data", "check", str(path), "--set", "data.preference=chosen"]) == 0
    out = capsys.readouterr().out
    assert "(preference): 2 records, all valid" in out and "training on the chosen answers" in out


# ---------------------------------------------------------------------------------------------
# KTO-style desirability labels


KTO = [
    {"prompt": Q_ES, "completion": A_ES, "label": True},
    {"prompt": Q_EN, "completion": "12 * 7 = 74", "label": False},
    {"messages": chat("¿Cuánto es 2^10?", "1000"), "label": False},
    {"prompt": "What is 9 * 9?", "completion": "81"},
]


def test_undesirable_records_are_left_out_counted_and_warned_about(tmp_path, caplog, capsys):
    path = write_jsonl(tmp_path / "kto.jsonl", KTO[:2] + KTO[3:])
    report = DataReport()
    with caplog.at_level(logging.WARNING, logger="mathtune"):
        ds = load_conversations([path], DataConfig(), report)
    assert [row["messages"][-1]["content"] for row in ds] == [A_ES, "81"]
    assert report.skipped_undesirable == 1
    assert "1 record labelled undesirable (label: false) left out" in caplog.text
    assert "data.on_undesirable: train" in caplog.text

    assert main(["data", "check", str(path)]) == 0
    assert "1 labelled undesirable (label: false) will be left out" in capsys.readouterr().out
    assert (dataset_stats([path]).skipped, dataset_stats([path]).records) == (1, 3)

    ds = load_conversations([path], DataConfig(on_undesirable="train"), DataReport())
    assert len(ds) == 3


def test_labels_are_read_in_conversations_and_as_csv_text(tmp_path):
    assert parse_record(KTO[2], "messages").desirable is False
    path = tmp_path / "kto.csv"
    path.write_text(f"prompt,completion,label\n{Q_EN},84,true\n{Q_EN},74,FALSE\n", encoding="utf-8")
    kinds = [type(conv).__name__ for _, conv, _ in iter_conversations(path)]
    assert kinds == ["Conversation", "Skipped"]
    assert isinstance(list(iter_conversations(path))[1][1], Skipped)


# ---------------------------------------------------------------------------------------------
# Wrappers


@pytest.mark.parametrize("indent", [None, 2], ids=["one line", "pretty"])
def test_one_list_of_records_under_a_key_is_read_and_said(tmp_path, indent):
    path = tmp_path / "export.json"
    records = [{"question": Q_EN, "answer": A_EN}, {"question": Q_ES, "answer": A_ES}]
    path.write_text(json.dumps({"version": 2, "data": records, "source": "mi-colegio"}, indent=indent), encoding="utf-8")
    notes = []
    rows = list(read_records(path, on_note=notes.append))
    assert rows == [(f"{path} [data[0]]", records[0]), (f"{path} [data[1]]", records[1])]
    assert notes == [f"{path}: the records are the list under 'data' (2 records; the file is read whole)"]
    report = DataReport()
    assert len(load_conversations([path], DataConfig(), report)) == 2
    assert any("the list under 'data'" in line for line in report.lines())


def test_a_wrapper_with_two_lists_is_refused_naming_them(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": [{"question": "a", "answer": "b"}], "test": [{"question": "c", "answer": "d"}]},
                               indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=r"holding 2 lists of records \(train, test\): give one per file"):
        list(read_records(path))


# ---------------------------------------------------------------------------------------------
# CSV, TSV, Parquet, Excel


def spanish_csv(tmp_path: Path) -> Path:
    """What Excel in a Spanish locale saves: BOM, ';' separator, quoted cells with line breaks."""
    path = tmp_path / "pares.csv"
    rows = ["pregunta;respuesta", f'"{Q_ES}";"{A_ES}"', '"What is 2 + 2?\nShow the steps.";"2 + 2 = 4; \\boxed{4}"',
            "Calcula 2^10;", ";;", "Halla x: 2x = 8;x = 4;sobra", "¿Cuánto es 10 % de 50?;5", ""]
    path.write_bytes("\ufeff".encode() + "\r\n".join(rows).encode("utf-8"))
    return path


def test_csv_rows_become_records_and_errors_name_row_and_column(tmp_path):
    path = spanish_csv(tmp_path)
    assert problems_of(path, **SPANISH_FIELDS) == [
        (f"{path} row 4", "column 'respuesta': is empty"),
        (f"{path} row 6", "3 cells, but the header has 2 columns (pregunta, respuesta): a cell holding the "
                          "separator ';' must be in double quotes"),
    ]
    report = DataReport()
    ds = load_conversations([path], DataConfig(on_invalid="skip", **SPANISH_FIELDS), report)
    assert [row["messages"][0]["content"] for row in ds] == [Q_ES, "What is 2 + 2?\nShow the steps.", "¿Cuánto es 10 % de 50?"]
    assert ds[1]["messages"][1]["content"] == "2 + 2 = 4; \\boxed{4}"
    assert report.records == 5  # the blank row 5 is no record


def test_csv_with_unknown_columns_suggests_data_fields_with_its_names(tmp_path, capsys):
    path = spanish_csv(tmp_path)
    assert main(["data", "check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "cannot tell the record shape from its columns (pregunta, respuesta)" in out
    assert "data.fields: {prompt: pregunta, response: respuesta}" in out


def test_csv_missing_column_and_bad_bytes(tmp_path):
    path = tmp_path / "notas.csv"
    path.write_text("pregunta,solucion\n¿2+2?,4\n", encoding="utf-8")
    assert problems_of(path, **SPANISH_FIELDS) == [(f"{path} row 2", "column 'respuesta': missing (columns: pregunta, solucion)")]
    latin = tmp_path / "latin1.csv"
    latin.write_bytes("question,answer\nWhat is 2+2?,4\n¿Cuántos años?,3\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv:3: not UTF-8 \(byte 0xbf\); in Excel save it as 'CSV UTF-8"):
        list(read_records(latin))
    twice = tmp_path / "twice.csv"
    twice.write_text("question,answer,answer\na,b,c\n", encoding="utf-8")
    with pytest.raises(DataError, match="row 1: the column name answer appears more than once"):
        list(read_records(twice))


def test_tsv_is_detected_as_question_answer(tmp_path):
    path = tmp_path / "qa.tsv"
    path.write_text(f"question\tanswer\ttopic\n{Q_EN}\t{A_EN}\tarithmetic\n{Q_ES}\t{A_ES}\t\n", encoding="utf-8")
    rows = list(iter_conversations(path))
    assert [(place, fmt) for place, _, fmt in rows] == [(f"{path} row {n}", "question_answer") for n in (2, 3)]
    assert [conv.topic for _, conv, _ in rows] == ["arithmetic", None]


def test_parquet_with_nested_messages_and_content_parts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train-00000.parquet"
    rows = [{"messages": chat(Q_ES, A_ES, parts=True)}, {"messages": chat(Q_EN, A_EN, parts=True)},
            {"messages": chat(Q_EN, "", parts=True)}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert problems_of(path) == [(f"{path} [row 2]", "column 'messages'[1].content[0].text: is empty")]
    ds = load_conversations([path], DataConfig(on_invalid="skip"), DataReport())
    assert [row["messages"] for row in ds] == [chat(Q_ES, A_ES), chat(Q_EN, A_EN)]


@pytest.mark.parametrize("name", ["problemas.xlsx", "problemas.ods"])
def test_spreadsheet_workbooks_get_save_as_csv(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"PK\x03\x04 not really a workbook")
    with pytest.raises(DataError, match=r"Save it as CSV: File > Save As > 'CSV UTF-8"):
        list(read_records(path))


# ---------------------------------------------------------------------------------------------
# Every shape: check, stats and the training loader agree; each tokenizes for training


def shape_files(tmp_path: Path) -> dict[str, tuple[Path, dict]]:
    csv_path = tmp_path / "pares.csv"
    csv_path.write_text(f"pregunta,respuesta\n\"{Q_ES}\",\"{A_ES}\"\n\"{Q_EN}\",\"{A_EN}\"\n¿Y 2+2?,\n", encoding="utf-8")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"query": Q_ES, "response": A_ES}, {"query": Q_EN, "response": A_EN}]}),
                       encoding="utf-8")
    return {
        "content parts": (write_jsonl(tmp_path / "parts.jsonl", [{"messages": chat(Q_ES, A_ES, parts=True)},
                                                                 {"messages": chat(Q_EN, A_EN, parts=True)},
                                                                 UNSUPPORTED[4][0]]), {}),
        "csv": (csv_path, SPANISH_FIELDS),
        "wrapper": (wrapped, {}),
        "preference": (write_jsonl(tmp_path / "dpo.jsonl", [PREFERENCE["trl standard"], PREFERENCE["trl conversational"],
                                                            {"prompt": Q_EN, "chosen": "", "rejected": "74"}]),
                       {"preference": "chosen"}),
        "kto": (write_jsonl(tmp_path / "kto.jsonl", KTO[:2] + KTO[3:]), {}),
    }


@pytest.mark.parametrize("shape", ["content parts", "csv", "wrapper", "preference", "kto"])
def test_check_stats_and_training_agree_and_tokenize(tmp_path, shape, chatml_tokenizer):
    path, settings = shape_files(tmp_path)[shape]
    cfg = DataConfig(files=[path], on_invalid="skip", eval_fraction=0.5, **settings)
    checked = check_files([path], lambda *_: None, cfg).files[0]
    stats = dataset_stats([path], cfg=cfg)
    report = DataReport()
    loaded = load_conversations([path], cfg, report)
    assert checked.records == stats.records == report.records
    assert checked.invalid == stats.invalid == report.skipped_invalid
    assert checked.skipped == stats.skipped == report.skipped_undesirable
    assert len(loaded) == checked.records - checked.invalid - checked.skipped == 2

    train, evaluation, report = build_datasets(cfg, chatml_tokenizer, seed=0)
    assert len(train) + len(evaluation) == 2
    for row in [*train, *evaluation]:
        trained = chatml_tokenizer.decode([t for t in row["labels"] if t != -100])
        # The answer only: never a rejected one, never one labelled undesirable
        assert trained.removesuffix("<|im_end|>") in (A_ES, A_EN, "81")
