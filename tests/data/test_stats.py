"""`mathtune data stats`: counts, lengths, tokens with the chat template, duplicates, topics, plots."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from mathtune.cli import main
from mathtune.config import DataConfig
from mathtune.data.builtin import builtin_files
from mathtune.data.formats import detect_format, parse_record
from mathtune.data.stats import Histogram, dataset_stats, near_key
from mathtune.data.tokenize import tokenize_conversation
from tests.conftest import write_jsonl

PAIRS = [
    {"instruction": "What is 12 * 7?", "output": "12 * 7 = 84. The answer is \\boxed{84}.", "topic": "arithmetic"},
    {"instruction": "What is 12 * 7?", "output": "12 * 7 = 84. The answer is \\boxed{84}.", "topic": "arithmetic"},  # exact
    {"instruction": "what is 12*7 ?", "output": "12 * 7 = 84. The answer is \\boxed{84}."},  # near, same question
    {"instruction": "Calcula la derivada de x^3.", "output": "3x^2"},  # only the answer: checkable
    {"instruction": "¿Qué es un número primo?", "output": "Un número con exactamente dos divisores."},  # prose: not
    {"instruction": "broken"},  # invalid: counted and left out
]
CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "Eres un tutor."},
                  {"role": "user", "content": "Halla el 10 % de 50."}, {"role": "assistant", "content": "\\boxed{5}"},
                  {"role": "user", "content": "¿Y el doble?"}, {"role": "assistant", "content": "La respuesta es 10."}]},
]


@pytest.fixture
def files(tmp_path):
    return [write_jsonl(tmp_path / "pairs.jsonl", PAIRS), write_jsonl(tmp_path / "conv.jsonl", CONVERSATIONS)]


def test_counts_per_shape_language_duplicates_answers_and_topics(files):
    stats = dataset_stats(files)
    d = stats.to_dict()
    assert (d["records"], d["invalid"]) == (7, 1)
    assert d["shapes"] == {"alpaca": {"records": 5, "turns": 10}, "messages": {"records": 1, "turns": 4}}
    assert d["languages"] == {"en": 3, "es": 3}
    assert d["duplicates"] == {"exact": 1, "near": 1, "same_question": 2}
    # The three 12*7 records, the bare "3x^2" and the conversation's last answer; not the prose one.
    assert d["checkable"] == 5
    # Labelled records keep their field; the others are detected.
    assert d["topics"] == {"arithmetic": 3, "derivatives": 1, "divisibility": 1, "percentages": 1}
    assert d["labelled_topics"] == 2
    q = d["lengths"]["question_chars"]
    assert (q["count"], q["min"], q["max"]) == (7, 12, 27)  # 5 pair questions + 2 user turns ("¿Y el doble?" is 12)
    assert d["tokens"] is None


def test_histogram_quantiles_are_exact():
    h = Histogram()
    for v in [5, 1, 3, 3, 9, 7, 2, 8, 4, 6]:
        h.add(v)
    assert h.summary() == {"count": 10, "min": 1, "median": 4, "mean": 4.8, "p95": 9, "max": 9}
    assert h.quantile(0.9) == 8 and h.above(7) == 2
    assert Histogram().summary() is None


def test_near_key_ignores_case_accents_punctuation_spacing_and_latex():
    assert near_key("¿Cuánto es \\frac{3}{4}?") == near_key("cuanto   es {3}{4}") == "cuanto es 3 4"
    assert near_key("What is 2+2?") != near_key("What is 2+3?")


def test_token_lengths_are_those_of_training(files, chatml_tokenizer):
    stats = dataset_stats(files, chatml_tokenizer, DataConfig(max_seq_length=40))
    expected = []
    for record in PAIRS[:-1] + CONVERSATIONS:
        conv = parse_record(record, detect_format(record))
        expected.append(len(tokenize_conversation(conv.messages, chatml_tokenizer, 10_000)["input_ids"]))
    summary = stats.to_dict()["tokens"]
    assert (summary["count"], summary["min"], summary["max"]) == (6, min(expected), max(expected))
    assert summary["over_max_seq_length"] == sum(n > 40 for n in expected) > 0


def test_cli_with_a_model_folder_json_and_plots(files, tiny_llama_dir, tmp_path, capsys):
    plots = tmp_path / "plots"
    assert main(["data", "stats", *map(str, files), "--model", str(tiny_llama_dir), "--json", "--plot", str(plots)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tokens"]["count"] == 6 and doc["tokens"]["max_seq_length"] == 512
    for name in ("lengths.png", "topics.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_table_on_the_bundled_dataset(capsys):
    assert main(["data", "stats", *map(str, builtin_files())]) == 0
    out = capsys.readouterr().out
    assert "816 records in 2 files" in out
    for line in ("alpaca        624   1248           2.0", "checkable final answers: 720 of 816 (88.2%)",
                 "(topics: 816 from the records' topic field, the rest detected)"):
        assert line in out
    assert out.count("  68   8.3%") == 12  # 12 topics, 68 records each


def test_a_config_sets_max_seq_length_and_the_record_shape(tmp_path, chatml_tokenizer, capsys):
    data = write_jsonl(tmp_path / "own.jsonl", [{"pregunta": "¿2+2?", "respuesta": "\\boxed{4}"}])
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  format: fields\n  fields: {prompt: pregunta, response: respuesta}\n  max_seq_length: 16\n")
    assert main(["data", "stats", str(data), "--config", str(config), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["shapes"] == {"fields": {"records": 1, "turns": 2}} and doc["checkable"] == 1


def test_stats_keep_a_few_bytes_per_record(tmp_path):
    """Histograms do not grow with the records; only two 8-byte hashes per record do."""

    def peak(n: int) -> int:
        path = write_jsonl(tmp_path / f"{n}.jsonl", [{"instruction": f"What is {i} + 1?", "output": f"\\boxed{{{i + 1}}}"}
                                                      for i in range(n)])
        tracemalloc.start()
        try:
            dataset_stats([path])
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(1_000), peak(8_000)
    assert (large - small) / 7_000 < 64, (small, large)


def test_a_file_of_only_invalid_records_is_an_error(tmp_path):
    from mathtune.errors import DataError

    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "output": " "}])
    with pytest.raises(DataError, match="every record is invalid; run `mathtune data check`"):
        dataset_stats([path])
    assert main(["data", "stats", str(path)]) == 2
