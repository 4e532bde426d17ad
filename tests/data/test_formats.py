"""Record shapes -> one Conversation; files -> records with places; bad records reported, never crashing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mathtune.config import DataConfig
from mathtune.data.dataset import DataReport, iter_conversations, load_conversations
from mathtune.data.formats import PAIR_KEYS, Conversation, RecordError, detect_format, parse_record
from mathtune.data.readers import read_json_records, read_records
from mathtune.errors import DataError
from mathtune.eval.evaluate import BENCHES
from tests.conftest import write_jsonl

GSM8K_SAMPLE = BENCHES["gsm8k"].file  # 300 real GSM8K test lines shipped in the package

Q = "¿Cuánto es 3/4 + 1/8?"
A = "Sumamos: 6/8 + 1/8 = 7/8. La respuesta es \\boxed{\\frac{7}{8}}."
SYSTEM = "Eres un tutor de matemáticas."
EXPECTED = [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]
FIELDS = {"prompt": "pregunta", "response": "respuesta", "system": None, "input": None}

SHAPES = {
    "alpaca": {"instruction": Q, "input": "", "output": A},
    "question_answer": {"question": Q, "answer": A},
    "prompt_completion": {"prompt": Q, "completion": A},
    "query_response": {"query": Q, "response": A},
    "messages": {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]},
    "sharegpt": {"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": A}]},
}


def parse(record, fmt):
    return parse_record(record, fmt, FIELDS if fmt == "fields" else None)


def record_error(record, fmt, fields=None) -> RecordError:
    with pytest.raises(RecordError) as excinfo:
        parse_record(record, fmt, fields)
    return excinfo.value


# ---------------------------------------------------------------------------------------------
# Every shape -> the same conversation


@pytest.mark.parametrize("fmt", sorted(SHAPES))
def test_every_shape_parses_to_the_same_conversation(fmt):
    conv = parse(SHAPES[fmt], fmt)
    assert isinstance(conv, Conversation)
    assert conv.messages == EXPECTED
    assert conv.topic is None
    assert conv.to_row() == {"messages": EXPECTED, "topic": None}


def test_fields_shape_parses_to_the_same_conversation():
    conv = parse_record({"pregunta": Q, "respuesta": A}, "fields", FIELDS)
    assert conv.messages == EXPECTED


def test_fields_shape_with_system_and_input_names():
    fields = {"prompt": "pregunta", "response": "respuesta", "system": "sistema", "input": "datos"}
    conv = parse_record({"pregunta": Q, "datos": "x = 2", "respuesta": A, "sistema": SYSTEM}, "fields", fields)
    assert conv.messages == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"{Q}\n\nx = 2"},
        {"role": "assistant", "content": A},
    ]


def test_alpaca_without_input_key():
    assert parse({"instruction": Q, "output": A}, "alpaca").messages == EXPECTED


def test_alpaca_input_is_appended_after_a_blank_line():
    conv = parse({"instruction": "Suma estas fracciones.", "input": "3/4 + 1/8", "output": A}, "alpaca")
    assert conv.messages[0] == {"role": "user", "content": "Suma estas fracciones.\n\n3/4 + 1/8"}
    assert conv.messages[1] == {"role": "assistant", "content": A}


def test_alpaca_null_input_is_ignored():
    assert parse({"instruction": Q, "input": None, "output": A}, "alpaca").messages == EXPECTED


@pytest.mark.parametrize("fmt", ["alpaca", "question_answer", "prompt_completion", "query_response"])
def test_pair_shapes_take_an_optional_system(fmt):
    record = {**SHAPES[fmt], "system": SYSTEM}
    assert parse(record, fmt).messages == [{"role": "system", "content": SYSTEM}, *EXPECTED]
    assert parse({**SHAPES[fmt], "system": ""}, fmt).messages == EXPECTED
    assert parse({**SHAPES[fmt], "system": None}, fmt).messages == EXPECTED


@pytest.mark.parametrize("fmt", sorted(SHAPES))
def test_topic_is_kept(fmt):
    assert parse({**SHAPES[fmt], "topic": "fractions"}, fmt).topic == "fractions"
    assert parse({**SHAPES[fmt], "topic": "  "}, fmt).topic is None
    assert parse({**SHAPES[fmt], "topic": 7}, fmt).topic is None


def test_fields_topic_is_kept():
    assert parse_record({"pregunta": Q, "respuesta": A, "topic": "algebra"}, "fields", FIELDS).topic == "algebra"


# ---------------------------------------------------------------------------------------------
# Detection


@pytest.mark.parametrize("fmt", sorted(SHAPES))
def test_detect_format(fmt):
    assert detect_format(SHAPES[fmt]) == fmt
    assert detect_format({**SHAPES[fmt], "topic": "x", "id": 3}) == fmt


@pytest.mark.parametrize(
    "record",
    [
        {"pregunta": Q, "respuesta": A},
        {"question": Q},  # half a pair
        {"instruction": Q, "answer": A},  # halves of two different pairs
        {},
        [SHAPES["messages"]],
        "question",
        None,
        42,
    ],
)
def test_detect_format_unknown(record):
    assert detect_format(record) is None


# ---------------------------------------------------------------------------------------------
# Multi-turn


def test_multi_turn_messages_and_sharegpt_agree():
    turns = [("user", "What is 2+2?"), ("assistant", "4"), ("user", "And 4*4?"), ("assistant", "16")]
    messages = {"messages": [{"role": "system", "content": SYSTEM}] + [{"role": r, "content": c} for r, c in turns]}
    sharegpt_role = {"user": "human", "assistant": "gpt"}
    sharegpt = {
        "conversations": [{"from": "system", "value": SYSTEM}] + [{"from": sharegpt_role[r], "value": c} for r, c in turns]
    }
    expected = [{"role": "system", "content": SYSTEM}] + [{"role": r, "content": c} for r, c in turns]
    assert parse(messages, "messages").messages == expected
    assert parse(sharegpt, "sharegpt").messages == expected


def test_sharegpt_accepts_user_and_assistant_role_names():
    record = {"conversations": [{"from": "user", "value": Q}, {"from": "assistant", "value": A}]}
    assert parse(record, "sharegpt").messages == EXPECTED


def test_extra_keys_in_turns_are_ignored():
    record = {"messages": [{"role": "user", "content": Q, "name": "ana"}, {"role": "assistant", "content": A, "weight": 1}]}
    assert parse(record, "messages").messages == EXPECTED


# ---------------------------------------------------------------------------------------------
# Record errors: field + message


def test_missing_field_lists_the_keys_present():
    err = record_error({"question": Q, "solution": A, "id": 1}, "question_answer")
    assert err.field == "answer"
    assert "missing" in str(err)
    assert "keys present: id, question, solution" in str(err)


def test_missing_field_inside_a_turn():
    err = record_error({"messages": [{"role": "user", "text": Q}, {"role": "assistant", "content": A}]}, "messages")
    assert err.field == "messages[0].content"
    assert "keys present: role, text" in str(err)


def test_missing_fields_field():
    err = record_error({"pregunta": Q}, "fields", FIELDS)
    assert err.field == "respuesta"
    assert "keys present: pregunta" in str(err)


@pytest.mark.parametrize("empty", ["", "   ", "\n\t"])
def test_empty_text(empty):
    err = record_error({"question": Q, "answer": empty}, "question_answer")
    assert err.field == "answer"
    assert str(err) == "answer: is empty"


def test_empty_turn_content():
    err = record_error({"conversations": [{"from": "human", "value": Q}, {"from": "gpt", "value": ""}]}, "sharegpt")
    assert err.field == "conversations[1].value"
    assert "is empty" in str(err)


@pytest.mark.parametrize(
    ("value", "type_name"), [(72, "a number"), (7.5, "a number"), (True, "a boolean"), (None, "null"), (["72"], "an array")]
)
def test_non_text_where_text_belongs(value, type_name):
    err = record_error({"question": Q, "answer": value}, "question_answer")
    assert err.field == "answer"
    assert str(err) == f"answer: expected text, got {type_name}"


def test_number_as_turn_content():
    err = record_error({"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": 84}]}, "messages")
    assert err.field == "messages[1].content"
    assert "expected text, got a number" in str(err)


def test_unknown_role_lists_the_accepted_roles():
    err = record_error({"messages": [{"role": "human", "content": Q}, {"role": "assistant", "content": A}]}, "messages")
    assert err.field == "messages[0].role"
    assert "unknown role 'human'" in str(err)
    assert "expected one of system, user, assistant" in str(err)


def test_unknown_sharegpt_role_lists_the_accepted_roles():
    err = record_error({"conversations": [{"from": "human", "value": Q}, {"from": "bot", "value": A}]}, "sharegpt")
    assert err.field == "conversations[1].from"
    assert "unknown role 'bot'" in str(err)
    for role in ("system", "human", "user", "gpt", "assistant"):
        assert role in str(err).split("expected one of", 1)[1]


def test_missing_role():
    err = record_error({"messages": [{"content": Q}, {"role": "assistant", "content": A}]}, "messages")
    assert err.field == "messages[0].role"
    assert "unknown role None" in str(err)


def test_conversation_ending_on_the_user():
    record = {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}, {"role": "user", "content": "?"}]}
    err = record_error(record, "messages")
    assert err.field == "turn 2"
    assert "ends on the user" in str(err)


def test_two_assistant_turns_in_a_row():
    record = {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q},
                           {"role": "assistant", "content": A}, {"role": "assistant", "content": A}]}
    err = record_error(record, "messages")
    assert err.field == "turn 3"  # counted in the record, system included
    assert "two assistant turns in a row" in str(err)


def test_first_turn_must_be_the_user():
    err = record_error({"conversations": [{"from": "gpt", "value": A}, {"from": "human", "value": Q}]}, "sharegpt")
    assert err.field == "turn 0"
    assert "the first turn must be the user's" in str(err)


def test_system_message_not_first():
    record = {"messages": [{"role": "user", "content": Q}, {"role": "system", "content": SYSTEM},
                           {"role": "assistant", "content": A}]}
    err = record_error(record, "messages")
    assert err.field == "turn 1"
    assert "a system message is only allowed first" in str(err)


def test_system_only_conversation():
    err = record_error({"messages": [{"role": "system", "content": SYSTEM}]}, "messages")
    assert err.field == ""
    assert "has no user or assistant turn" in str(err)


@pytest.mark.parametrize(("record", "type_name"), [([1, 2], "an array"), ("text", "a string"), (None, "null"), (3, "a number")])
@pytest.mark.parametrize("fmt", ["messages", "question_answer"])
def test_non_object_record(record, type_name, fmt):
    err = record_error(record, fmt)
    assert err.field == ""
    assert str(err) == f"expected a JSON object, got {type_name}"


@pytest.mark.parametrize(("fmt", "key"), [("messages", "messages"), ("sharegpt", "conversations")])
def test_empty_turn_list(fmt, key):
    err = record_error({key: []}, fmt)
    assert err.field == key
    assert str(err) == f"{key}: is empty"


@pytest.mark.parametrize(("value", "type_name"), [("hi", "a string"), ({"role": "user"}, "an object"), (None, "null")])
def test_turns_not_a_list(value, type_name):
    err = record_error({"messages": value}, "messages")
    assert err.field == "messages"
    assert f"expected a list of turns, got {type_name}" in str(err)


def test_turn_not_an_object():
    err = record_error({"messages": ["hello", {"role": "assistant", "content": A}]}, "messages")
    assert err.field == "messages[0]"
    assert "expected an object with 'role' and 'content', got a string" in str(err)


def test_record_error_is_a_value_error():
    assert issubclass(RecordError, ValueError)


# ---------------------------------------------------------------------------------------------
# Reading files


def test_jsonl_places_are_line_numbers(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        json.dumps(SHAPES["question_answer"]) + "\n\n" + json.dumps({"question": "b", "answer": "c"}) + "\n", encoding="utf-8"
    )
    records = list(read_json_records(path))
    assert [place for place, _ in records] == [f"{path}:1", f"{path}:3"]  # blank line skipped, numbering kept
    assert records[1][1] == {"question": "b", "answer": "c"}


def test_jsonl_without_trailing_newline_and_crlf(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"question": "a", "answer": "b"}\r\n{"question": "c", "answer": "d"}')
    assert [value["question"] for _, value in read_json_records(path)] == ["a", "c"]


def test_json_array_places_are_record_indexes(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([SHAPES["alpaca"], SHAPES["alpaca"], {"instruction": "x", "output": "y"}], indent=2),
                    encoding="utf-8")
    records = list(read_json_records(path))
    assert [place for place, _ in records] == [f"{path} [record 0]", f"{path} [record 1]", f"{path} [record 2]"]
    assert records[2][1] == {"instruction": "x", "output": "y"}


def test_jsonl_with_bom(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(SHAPES["prompt_completion"]) + "\n").encode())
    assert list(read_json_records(path)) == [(f"{path}:1", SHAPES["prompt_completion"])]


def test_json_array_with_bom(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([SHAPES["query_response"]], indent=2).encode())
    assert list(read_json_records(path)) == [(f"{path} [record 0]", SHAPES["query_response"])]


def test_json_file_with_one_record_per_line(tmp_path):
    path = write_jsonl(tmp_path / "train.json", [SHAPES["query_response"], SHAPES["messages"]])
    places = [place for place, _ in read_json_records(path)]
    assert places == [f"{path}:1", f"{path}:2"]
    assert [fmt for _, _, fmt in iter_conversations(path)] == ["query_response", "query_response"]


def test_malformed_json_line_names_file_line_and_column(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n{"question": "a", "answer": "b"}\n{"question": "a" "answer": "b"}\n',
                    encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        list(read_json_records(path))
    (problem,) = excinfo.value.problems
    assert problem.startswith(f"{path}:3:18: invalid JSON:")
    assert "Expecting ',' delimiter" in problem


def test_malformed_json_column_counts_leading_whitespace(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n    {"question": "a" "answer": "b"}\n', encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        list(read_json_records(path))
    assert excinfo.value.problems[0].startswith(f"{path}:2:22: invalid JSON:")


def test_malformed_json_array_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n  {"question": "a", "answer": "b"},\n  {"question": "a",}\n]\n', encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        list(read_json_records(path))
    assert excinfo.value.problems[0].startswith(f"{path}:3:20: invalid JSON:")


def test_non_utf8_byte_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"question": "a", "answer": "b"}\n{"question": "matem\xe1ticas", "answer": "b"}\n')
    with pytest.raises(DataError) as excinfo:
        list(read_json_records(path))
    (problem,) = excinfo.value.problems
    assert problem.startswith(f"{path}:2: not UTF-8 (byte 0xe1)")


def test_non_utf8_byte_in_an_array_names_the_line(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[\n {"question": "a", "answer": "b"},\n {"question": "matem\xe1ticas", "answer": "b"}\n]\n')
    with pytest.raises(DataError) as excinfo:
        list(read_json_records(path))
    assert excinfo.value.problems[0].startswith(f"{path}:3: not UTF-8")


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b"\xef\xbb\xbf"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as excinfo:
        list(read_json_records(path))
    assert excinfo.value.problems == [f"{path}: the file is empty; expected JSON records"]


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file") as excinfo:
        list(read_records(tmp_path / "nope.jsonl"))
    # A file-level problem is not counted as an invalid record.
    assert str(excinfo.value) == f"{tmp_path / 'nope.jsonl'}: no such file"
    assert excinfo.value.total_bad is None


def test_one_pretty_printed_object_is_explained(tmp_path):
    path = tmp_path / "one.json"
    # Holding no list of records (one list is read: tests/data/test_shapes.py)
    path.write_text(json.dumps({"data": SHAPES["question_answer"], "version": 2}, indent=2), encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        list(read_json_records(path))
    (problem,) = excinfo.value.problems
    assert "the file is one JSON object (keys: data, version)" in problem
    assert "expected an array of records or one record per line" in problem


@pytest.mark.parametrize("content", ["42\n", '"just text"\n', "null\n", "true\n"])
def test_top_level_scalar_is_rejected(tmp_path, content):
    path = tmp_path / "scalar.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as excinfo:
        list(read_json_records(path))
    assert "expected a JSON array of records or one JSON object per line" in excinfo.value.problems[0]


def test_unknown_shape_hints_at_fields_format(tmp_path):
    path = write_jsonl(tmp_path / "es.jsonl", [{"pregunta": Q, "respuesta": A}])
    with pytest.raises(DataError) as excinfo:
        list(iter_conversations(path))
    (problem,) = excinfo.value.problems
    assert problem.startswith(f"{path}:1: cannot tell the record shape from its keys (pregunta, respuesta)")
    assert "data.format: fields" in str(excinfo.value)


def test_array_of_scalars_is_an_unknown_shape(tmp_path):
    path = tmp_path / "nums.json"
    path.write_text("[1, 2, 3]", encoding="utf-8")
    with pytest.raises(DataError, match=r"\[record 0\]: cannot tell the record shape"):
        list(iter_conversations(path))


def test_iter_conversations_yields_errors_in_place(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [SHAPES["alpaca"], {"instruction": Q, "output": 3}, "oops", SHAPES["alpaca"]])
    rows = list(iter_conversations(path))
    assert [place for place, _, _ in rows] == [f"{path}:{i}" for i in (1, 2, 3, 4)]
    assert {fmt for _, _, fmt in rows} == {"alpaca"}
    kinds = [type(conv).__name__ for _, conv, _ in rows]
    assert kinds == ["Conversation", "RecordError", "RecordError", "Conversation"]
    assert rows[1][1].field == "output"


def test_iter_conversations_with_explicit_format(tmp_path):
    path = write_jsonl(tmp_path / "es.jsonl", [{"pregunta": Q, "respuesta": A}])
    ((place, conv, fmt),) = iter_conversations(path, DataConfig(format="fields", fields=FIELDS))
    assert (place, fmt) == (f"{path}:1", "fields")
    assert conv.messages == EXPECTED
    # An explicit format is applied, not detected: a question/answer record read as alpaca is a record error.
    path = write_jsonl(tmp_path / "qa.jsonl", [SHAPES["question_answer"]])
    ((_, err, fmt),) = iter_conversations(path, DataConfig(format="alpaca"))
    assert isinstance(err, RecordError) and err.field == "instruction" and fmt == "alpaca"


# ---------------------------------------------------------------------------------------------
# load_conversations


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def mixed_file(path: Path) -> Path:
    records = [
        SHAPES["question_answer"],
        {"question": Q, "answer": 72},  # line 2
        SHAPES["question_answer"],
        {"question": "", "answer": A},  # line 4
        {"question": "2+2?", "answer": "4", "topic": "arithmetic"},
        {"question": Q},  # line 6
        SHAPES["question_answer"],
    ]
    return write_jsonl(path, records)


def test_load_conversations_lists_every_bad_record(tmp_path, hf_cache):
    path = mixed_file(tmp_path / "mixed.jsonl")
    report = DataReport()
    with pytest.raises(DataError) as excinfo:
        load_conversations([path], DataConfig(), report)
    assert excinfo.value.problems == [
        f"{path}:2: answer: expected text, got a number",
        f"{path}:4: question: is empty",
        f"{path}:6: answer: missing (keys present: question)",
    ]
    message = str(excinfo.value)
    assert message.startswith("3 invalid records:")
    assert "data.on_invalid: skip" in message
    assert report.records == 7


def test_load_conversations_max_errors(tmp_path, hf_cache):
    path = mixed_file(tmp_path / "mixed.jsonl")
    with pytest.raises(DataError) as excinfo:
        load_conversations([path], DataConfig(max_errors=2), DataReport())
    assert excinfo.value.problems == [f"{path}:2: answer: expected text, got a number", f"{path}:4: question: is empty"]
    assert "... and 1 more" in str(excinfo.value)
    assert str(excinfo.value).startswith("3 invalid records:")


def test_load_conversations_skip_keeps_only_valid_rows(tmp_path, hf_cache):
    path = mixed_file(tmp_path / "mixed.jsonl")
    report = DataReport()
    ds = load_conversations([path], DataConfig(on_invalid="skip"), report)
    assert len(ds) == 4
    assert report.records == 7
    assert report.skipped_invalid == 3
    assert report.files == {str(path): "question_answer"}
    rows = list(ds)
    assert rows[0]["messages"] == EXPECTED
    assert [row["topic"] for row in rows] == [None, None, "arithmetic", None]
    assert any("skipped 3 invalid records" in line for line in report.lines())


def test_load_conversations_several_files_and_fields(tmp_path, hf_cache):
    es = write_jsonl(tmp_path / "es.jsonl", [{"pregunta": Q, "respuesta": A}] * 3)
    cfg = DataConfig(format="fields", fields={"prompt": "pregunta", "response": "respuesta"})
    report = DataReport()
    ds = load_conversations([es], cfg, report)
    assert len(ds) == 3 and ds[0]["messages"] == EXPECTED
    assert report.files == {str(es): "fields"}

    qa = write_jsonl(tmp_path / "qa.jsonl", [SHAPES["question_answer"]] * 2)
    chat = write_jsonl(tmp_path / "chat.jsonl", [SHAPES["sharegpt"]] * 3)
    report = DataReport()
    ds = load_conversations([qa, chat], DataConfig(), report)
    assert len(ds) == 5
    assert report.files == {str(qa): "question_answer", str(chat): "sharegpt"}
    assert all(row["messages"] == EXPECTED for row in ds)


def test_load_conversations_all_invalid_with_skip_fails(tmp_path, hf_cache):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": Q, "answer": 1}, {"question": Q, "answer": ""}])
    report = DataReport()
    with pytest.raises(DataError) as excinfo:
        load_conversations([path], DataConfig(on_invalid="skip"), report)
    assert excinfo.value.problems == [f"{path}:1: answer: expected text, got a number", f"{path}:2: answer: is empty"]
    assert report.skipped_invalid == 0


# ---------------------------------------------------------------------------------------------
# Real GSM8K


def test_gsm8k_test_head_loads_as_question_answer(tmp_path, hf_cache):
    with GSM8K_SAMPLE.open(encoding="utf-8") as fh:
        head = [next(fh) for _ in range(50)]
    path = tmp_path / "gsm8k-head.jsonl"
    path.write_text("".join(head), encoding="utf-8")
    report = DataReport()
    ds = load_conversations([path], DataConfig(), report)
    assert report.files == {str(path): "question_answer"}
    assert len(ds) == 50 and report.records == 50 and report.skipped_invalid == 0
    first = json.loads(head[0])
    assert ds[0]["messages"] == [{"role": "user", "content": first["question"]},
                                 {"role": "assistant", "content": first["answer"]}]
    import re

    for row in ds:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert re.search(r"#### -?[\d,]+(\.\d+)?$", row["messages"][1]["content"]), row["messages"][1]["content"][-40:]


def test_gsm8k_sample_streams_without_errors():
    count = 0
    for place, conv, fmt in iter_conversations(GSM8K_SAMPLE):
        assert isinstance(conv, Conversation), (place, conv)
        assert fmt == "question_answer"
        count += 1
    assert count == 300
    assert place == f"{GSM8K_SAMPLE}:300"


# ---------------------------------------------------------------------------------------------
# Fuzz: arbitrary JSON never crashes a parser


FIELD_NAMES = ["messages", "role", "content", "instruction", "input", "output", "from", "value", "conversations",
               "question", "answer", "prompt", "completion", "query", "response", "system", "topic",
               "pregunta", "respuesta", "user", "assistant", "human", "gpt"]
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8))
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12),
    st.sampled_from(["", " ", "user", "assistant", "system", "human", "gpt"]),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=5), st.dictionaries(keys, children, max_size=6)),
    max_leaves=25,
)
ALL_FORMATS = ["messages", "sharegpt", "fields", *PAIR_KEYS]
FUZZ_FIELDS = {"prompt": "pregunta", "response": "respuesta", "system": "system", "input": "input"}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values)
def test_parsers_raise_only_record_errors(value):
    for fmt in ALL_FORMATS:
        try:
            conv = parse_record(value, fmt, FUZZ_FIELDS if fmt == "fields" else None)
        except RecordError as exc:
            assert isinstance(exc.field, str)
            continue
        # Whatever parses is a well-formed conversation.
        roles = [m["role"] for m in conv.messages]
        body = roles[1:] if roles[0] == "system" else roles
        assert body and body[-1] == "assistant"
        assert body[::2] == ["user"] * len(body[::2]) and body[1::2] == ["assistant"] * len(body[1::2])
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in conv.messages)
    assert detect_format(value) in (None, *ALL_FORMATS)
