"""Whole data files, fuzzed: `mathtune data check` and training read them with one validation, so
whatever a file holds they agree, and it ends in "valid, and training tokenizes it" or in a clean
error that names the file. Never a traceback.

Files are built from arbitrary JSON structure and nesting (records of every shape, and anything
else), arbitrary Unicode (control characters, unpaired surrogates escaped in JSON or written raw,
right-to-left marks, combining marks, emoji), numbers Python cannot hold (5,000 digits, 1e400, NaN),
nesting thousands deep, and mixed encodings (a BOM, UTF-16, a line saved as Latin-1 or cp1252).

    pytest tests/data/test_fuzz_files.py                 # 100 files, ~1 minute
    pytest tests/data/test_fuzz_files.py -m slow         # 3,000 files

Inputs that ever broke it are kept in fuzz_regressions.jsonl and replayed by every run.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mathtune.config import DataConfig
from mathtune.data.check import check_files, run_check
from mathtune.data.dataset import DataReport, split_conversations, too_few_records
from mathtune.data.tokenize import tokenize_splits
from mathtune.errors import MathtuneError
from tests.conftest import build_chatml_tokenizer

REGRESSIONS = Path(__file__).with_name("fuzz_regressions.jsonl")
TOKENIZER = build_chatml_tokenizer()


class Raw(str):
    """JSON text written as is: what json.dumps cannot produce from Python values."""


SPECIAL = ["\u202e", "\u200f", "\u0301\u0301", "\u200b", "\x00", "\x1b[31m", "\x7f", "\ud800", "\udfff",
           "\ud83d\ude00", "\u2028", "\ufeff", "\r\n", "\t", "e\u0301", "\u0645\u0631\u062d\u0628\u0627", "ñ", "∫x²dx",
           "<|im_end|>", "<|im_start|>assistant\n", "{{ raise_exception('x') }}", "\\boxed{4}", " ", "\u3000"]
RAW_NUMBERS = [Raw("1" + "0" * 5000), Raw("-" + "9" * 4301), Raw("1e400"), Raw("-1e999"), Raw("NaN"), Raw("Infinity"),
               Raw("-0"), Raw("1E-400"), Raw("123456789012345678901234567890")]
KEYS = ["messages", "conversations", "role", "content", "from", "value", "instruction", "input", "output", "question",
        "answer", "prompt", "completion", "query", "response", "system", "topic"]

SURROGATES = st.characters(categories=["Cs"])
texts = st.one_of(  # anything a JSON string can hold, unpaired surrogates included
    st.lists(st.one_of(st.characters(), SURROGATES, st.sampled_from(SPECIAL)), max_size=8).map("".join),
    st.sampled_from(SPECIAL),
)
# Text a record may hold, odd as it is: never empty, no unpaired surrogate.
good_texts = st.lists(st.one_of(st.characters(exclude_categories=["Cs"]),
                                st.sampled_from([c for c in SPECIAL if not "\ud800" <= c[0] <= "\udfff"])),
                      max_size=8).map(lambda parts: "x" + "".join(parts))
leaves = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(), texts, st.sampled_from(RAW_NUMBERS),
                   st.integers(500, 5000).map(lambda n: Raw("[" * n + "]" * n)))
anything = st.recursive(leaves, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.sampled_from(KEYS), texts), inner, max_size=4)),
    max_leaves=12)
# Fields no shape reads hold numbers Python cannot hold, floats, nulls (and texts: a raw unpaired
# surrogate there makes the file invalid UTF-8, which the hostile records cover).
extras = st.dictionaries(st.sampled_from(["id", "topic", "source", "difficulty"]),
                         st.one_of(st.none(), st.integers(), st.floats(), good_texts, st.sampled_from(RAW_NUMBERS)),
                         max_size=2)
PAIRS = {"instruction": "output", "question": "answer", "prompt": "completion", "query": "response"}


def good_records(shape: str):
    """Records of one shape that training must accept, whatever their text holds."""
    if shape in PAIRS:
        return st.builds(lambda q, a, extra: {**extra, shape: q, PAIRS[shape]: a}, good_texts, good_texts, extras)
    key, role, text = ("messages", "role", "content") if shape == "messages" else ("conversations", "from", "value")
    user, assistant = ("user", "assistant") if shape == "messages" else ("human", "gpt")
    exchange = st.tuples(good_texts, good_texts).map(lambda qa: [{role: user, text: qa[0]}, {role: assistant, text: qa[1]}])
    turns = st.lists(exchange, min_size=1, max_size=2).map(lambda pairs: [turn for pair in pairs for turn in pair])
    return st.builds(lambda t, extra: {**extra, key: t}, turns, extras)


@st.composite
def record_lists(draw) -> list:
    """Mostly well-formed files of one shape (some with one hostile record among them), or anything."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.lists(anything, min_size=1, max_size=5))
    values = draw(st.lists(good_records(draw(st.sampled_from(["messages", "sharegpt", *PAIRS]))), min_size=2, max_size=6))
    if draw(st.integers(0, 3)) == 0:
        values[draw(st.integers(0, len(values) - 1))] = draw(anything)
    return values


def dump(value, ascii_only: bool) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{dump(str(k), ascii_only)}: {dump(v, ascii_only)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dump(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


@st.composite
def data_files(draw) -> tuple[str, bytes]:
    """(file name, bytes) of a whole data file."""
    values = draw(record_lists())
    ascii_only = draw(st.booleans())
    as_array = draw(st.booleans())
    lines = [dump(v, ascii_only) for v in values]
    text = "[" + ",\n".join(lines) + "]" if as_array else "\n".join(lines) + draw(st.sampled_from(["", "\n", "\n\n"]))
    encoding = draw(st.sampled_from(["utf-8"] * 6 + ["utf-8-sig", "utf-16", "line in latin-1", "line in cp1252"]))
    if encoding.startswith("line in"):
        parts = text.split("\n")
        i = draw(st.integers(0, len(parts) - 1))
        data = b"\n".join(p.encode(encoding[8:], "replace") if j == i else p.encode("utf-8", "surrogatepass")
                          for j, p in enumerate(parts))
    else:
        data = text.encode(encoding, "surrogatepass")
    return ("data.json" if as_array else "data.jsonl"), data


def check_then_train(name: str, data: bytes) -> str:
    """The property: data check never raises, names its places, and training accepts exactly what it
    passes (tokenizing every valid record) or refuses with an error naming the file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        for as_json in (False, True):  # what the command prints, to a strict UTF-8 stdout
            with contextlib.redirect_stdout(io.TextIOWrapper(io.BytesIO(), encoding="utf-8")):
                run_check([path], as_json=as_json)
        problems: list[str] = []
        report = check_files([path], lambda place, message: problems.append(place))
        assert all(place.startswith(str(path)) for place in problems)
        (checked,) = report.files
        valid = checked.records - checked.invalid - checked.skipped
        check_ok = report.ok and too_few_records(valid, DataConfig()) is None
        cfg = DataConfig(files=[path])
        made = DataReport()
        try:
            train, held_out = split_conversations(cfg, 0, made)
            tokenize_splits(train, held_out, TOKENIZER, cfg, made)
        except MathtuneError as exc:
            assert str(path) in str(exc), exc
            assert not check_ok, f"data check passed what training refuses: {exc}"
            return "refused"
        assert check_ok, f"training accepted what data check refused: {problems}"
        # Every valid record became an example (texts are short: nothing is truncated away).
        assert made.train_examples + made.eval_examples == valid
        return "trained"


SLOW_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]


@settings(max_examples=100, deadline=None, suppress_health_check=SLOW_HEALTH)
@given(file=data_files())
def test_any_file_is_trained_on_or_refused_with_its_place_and_check_agrees(file):
    event(check_then_train(*file))  # --hypothesis-show-statistics: how many were trained on, how many refused


@pytest.mark.slow
@settings(max_examples=3000, deadline=None, suppress_health_check=SLOW_HEALTH)
@given(file=data_files())
def test_any_file_many_more_examples(file):
    event(check_then_train(*file))


def regressions() -> list[dict]:
    return [json.loads(line) for line in REGRESSIONS.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("case", regressions(), ids=lambda case: case["id"])
def test_inputs_that_once_broke_it(case):
    assert check_then_train(case["name"], base64.b64decode(case["base64"])) == case["outcome"]
