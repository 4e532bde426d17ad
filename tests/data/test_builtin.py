"""The bundled dataset: reproducible, balanced, well-shaped, and every boxed answer is right."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import pytest
import sympy as sp
from math_verify import parse, verify

from mathtune.data.builtin import BUILTIN_DIR, builtin_files
from mathtune.data.builtin.generate import TOPICS, generate_records

FORBIDDEN_KEYS = {"answer", "question", "prompt", "completion", "query", "response", "conversations"}


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def files():
    pairs_path, convs_path = builtin_files()
    return read_jsonl(pairs_path), read_jsonl(convs_path)


@pytest.fixture(scope="module")
def records():
    return generate_records(0)


def assistant_texts(record):
    if "messages" in record:
        return [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    return [record["output"]]


def test_builtin_files_point_at_the_committed_files():
    assert [p.name for p in builtin_files()] == ["pairs.jsonl", "conversations.jsonl"]
    assert all(p.parent == BUILTIN_DIR and p.is_file() for p in builtin_files())


def test_regenerating_gives_byte_identical_files(tmp_path):
    cmd = [sys.executable, "-m", "mathtune.data.builtin.generate", "--out", str(tmp_path), "--seed", "0"]
    subprocess.run(cmd, check=True, capture_output=True)
    for committed in builtin_files():
        assert (tmp_path / committed.name).read_bytes() == committed.read_bytes(), committed.name


def test_seed_changes_the_data_and_same_seed_repeats_it():
    assert generate_records(1) == generate_records(1)
    assert generate_records(1) != generate_records(0)


def test_files_are_the_in_memory_records_without_private_keys(files, records):
    written = files[0] + files[1]
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]
    assert written == public
    assert all(not k.startswith("_") for r in written for k in r)


def test_counts_languages_and_topics(files):
    pairs, convs = files
    assert pairs and convs
    everything = pairs + convs
    assert len(everything) >= 600
    langs = Counter(r["lang"] for r in everything)
    assert set(langs) == {"es", "en"}
    assert all(n >= 0.4 * len(everything) for n in langs.values()), langs
    topics = Counter(r["topic"] for r in everything)
    assert set(topics) <= set(TOPICS)
    assert sum(n >= 30 for n in topics.values()) >= 10, topics


def test_pair_records_have_alpaca_shape(files):
    for r in files[0]:
        assert set(r) <= {"instruction", "output", "topic", "lang", "system", "input"}, r
        for key in ("instruction", "output", "topic", "lang") + tuple(k for k in ("system", "input") if k in r):
            assert isinstance(r[key], str) and r[key].strip(), (key, r)
    # the optional fields appear, but only in a minority
    assert 0 < sum("system" in r for r in files[0]) < len(files[0]) / 2
    assert 0 < sum("input" in r for r in files[0]) < len(files[0]) / 2


def test_conversations_alternate_and_end_on_the_assistant(files):
    exchanges = Counter()
    for r in files[1]:
        assert set(r) == {"messages", "topic", "lang"}, r
        msgs = r["messages"]
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in msgs), r
        body = msgs[1:] if msgs[0]["role"] == "system" else msgs
        assert [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2), r
        assert len(body) % 2 == 0 and body[-1]["role"] == "assistant"
        exchanges[len(body) // 2] += 1
    assert set(exchanges) <= {2, 3} and len(exchanges) == 2, exchanges
    assert any(r["messages"][0]["role"] == "system" for r in files[1])


def test_no_forbidden_keys_anywhere(files):
    def keys(value):
        if isinstance(value, dict):
            for k, v in value.items():
                yield k
                yield from keys(v)
        elif isinstance(value, list):
            for v in value:
                yield from keys(v)

    found = {k for r in files[0] + files[1] for k in keys(r)} & FORBIDDEN_KEYS
    assert not found


def test_answer_layout_and_language(records):
    final = {"es": "La respuesta es \\boxed{", "en": "The answer is \\boxed{"}
    concepts = 0
    for r in records:
        texts, answers = assistant_texts(r), r["_answers"]
        assert len(texts) == len(answers)
        for text, value in zip(texts, answers):
            if value is None:  # concept explanation: prose, no final answer
                concepts += 1
                assert "\\boxed" not in text and "\n" not in text
                continue
            *working, last = text.split("\n")
            assert 1 <= len(working) <= 3, text
            assert last.startswith(final[r["lang"]]) and last.endswith("}."), text
            assert text.count("\\boxed{") == 1
    worked = sum(len(r["_answers"]) for r in records) - concepts
    assert 0.08 * worked < concepts < 0.25 * worked, (concepts, worked)


def _gold(value):
    """math-verify parses letters as real symbols with lowercase names (C -> c); match that."""
    return value.subs({s: sp.Symbol(s.name.lower(), real=True) for s in value.free_symbols})


def _off_by_one(value):
    return sp.FiniteSet(*(e + 1 for e in value)) if isinstance(value, sp.FiniteSet) else value + 1


def test_every_boxed_answer_verifies_against_the_computed_value(records):
    checked = 0
    for r in records:
        for text, value in zip(assistant_texts(r), r["_answers"]):
            if value is None:
                continue
            predicted = parse(text)
            assert predicted, f"math-verify found no answer in {text!r}"
            assert verify([_gold(value)], predicted), (value, text)
            # a wrong value must not verify: proves the check can fail
            assert not verify([_gold(_off_by_one(value))], predicted), (value, text)
            checked += 1
    assert checked >= 500
