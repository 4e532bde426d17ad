"""`mathtune data check`: every problem with its place, exit codes, JSON, streaming in bounded memory."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from mathtune import display
from mathtune.cli import main
from mathtune.data.builtin import builtin_files
from mathtune.data.check import check_files, run_check
from tests.conftest import write_jsonl

GOOD = {"instruction": "What is 2 + 2?", "output": "2 + 2 = 4. \\boxed{4}"}


def _mixed(tmp_path: Path) -> Path:
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(GOOD), json.dumps({"instruction": "Only a question"}), "{not json", "",
             json.dumps({"instruction": "Q", "output": ""}), json.dumps(GOOD), json.dumps(["a", "list"])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    latin1 = '{"instruction": "años"}'.encode("latin-1")
    path.with_name("latin1.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n" + latin1 + b"\n")
    return path


def test_every_problem_is_listed_with_its_place_and_checking_goes_on(tmp_path, capsys):
    path = _mixed(tmp_path)
    problems = []
    report = check_files([path, tmp_path / "latin1.jsonl"], lambda place, msg: problems.append((place, msg)))
    assert problems == [
        (f"{path}:2", "output: missing (keys present: instruction)"),
        (f"{path}:3:2", "invalid JSON: Expecting property name enclosed in double quotes"),
        (f"{path}:5", "output: is empty"),
        (f"{path}:7", "expected a JSON object, got an array"),
        (f"{tmp_path / 'latin1.jsonl'}:2", "not UTF-8 (byte 0xf1); save the file as UTF-8"),
    ]
    first = report.files[0]
    assert (first.format, first.records, first.invalid, first.error) == ("alpaca", 6, 4, None)
    assert not report.ok

    assert run_check([path]) == 1
    out = capsys.readouterr().out
    assert f"{path}:3:2: invalid JSON" in out and f"{path} (alpaca): 6 records, 4 invalid" in out


def test_valid_files_exit_0_and_the_cli_returns_the_status(tmp_path, capsys):
    assert main(["data", "check", *map(str, builtin_files())]) == 0
    assert "OK: every record is valid" in capsys.readouterr().out
    assert main(["data", "check", str(_mixed(tmp_path))]) == 1


def test_file_level_problems_are_reported_and_the_other_files_still_checked(tmp_path, capsys):
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"foo": 1}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    good = write_jsonl(tmp_path / "good.jsonl", [GOOD])
    assert run_check([tmp_path / "missing.jsonl", unknown, empty, good]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'missing.jsonl'}: no such file" in out
    assert f"{unknown}:1: cannot tell the record shape from its keys (foo)" in out
    assert f"{empty}: the file is empty" in out
    assert f"{good} (alpaca): 1 records, all valid" in out


def test_json_output_lists_every_problem(tmp_path, capsys):
    path = _mixed(tmp_path)
    assert main(["data", "check", "--json", str(path)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["records"] == 6 and doc["invalid"] == 4
    assert [p["place"] for p in doc["problems"]] == [f"{path}:2", f"{path}:3:2", f"{path}:5", f"{path}:7"]


def test_a_json_array_file_is_checked_with_record_indexes(tmp_path):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([GOOD, {"instruction": "Q", "output": 3}]), encoding="utf-8")
    problems = []
    check_files([path], lambda place, msg: problems.append((place, msg)))
    assert problems == [(f"{path} [record 1]", "output: expected text, got a number")]


def test_large_files_get_a_progress_bar_fed_with_every_byte(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "big.jsonl", [GOOD] * 500)
    seen = []

    class FakeBar:
        def __init__(self, total, **kwargs):
            seen.append(("total", total))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            seen.append(("update", n))

    import tqdm.auto

    monkeypatch.setattr(tqdm.auto, "tqdm", FakeBar)
    monkeypatch.setattr(display, "PROGRESS_MIN_BYTES", 1000)
    check_files([path], lambda *a: None)
    size = path.stat().st_size
    assert seen[0] == ("total", size)
    assert sum(n for kind, n in seen if kind == "update") == size
    # Small files: no bar at all.
    monkeypatch.setattr(display, "PROGRESS_MIN_BYTES", size + 1)
    seen.clear()
    check_files([path], lambda *a: None)
    assert seen == []


def _generate(path: Path, n: int) -> Path:
    # One invalid record in 50, as a real file might have; problems are discarded (text mode streams them).
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            record = {"instruction": f"What is {i} + {i + 1}?", "output": f"\\boxed{{{2 * i + 1}}}"}
            if i % 50 == 7:
                del record["output"]
            fh.write(json.dumps(record) + "\n")
    return path


def _peak_while_checking(path: Path) -> tuple[int, object]:
    tracemalloc.start()
    try:
        report = check_files([path], lambda place, msg: None)
        return tracemalloc.get_traced_memory()[1], report
    finally:
        tracemalloc.stop()


def test_checking_streams_in_bounded_memory(tmp_path):
    """Peak Python memory while checking 40,000 records is within a few hundred KB of that for 4,000:
    nothing is kept per record (the 1M-record figure is in the README)."""
    small, small_report = _peak_while_checking(_generate(tmp_path / "small.jsonl", 4_000))
    large, large_report = _peak_while_checking(_generate(tmp_path / "large.jsonl", 40_000))
    assert large_report.files[0].records == 40_000 and large_report.files[0].invalid == 800
    assert large - small < 256 * 1024, (small, large)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_a_million_records_are_checked_with_flat_rss(tmp_path):
    """Measured (2-core machine): 1,000,000 records (98 MB) in about 6 s; peak RSS 26 MB for the command."""
    import subprocess
    import sys

    path = _generate(tmp_path / "million.jsonl", 1_000_000)
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's size (pytest with models loaded).
    code = ("import sys; from pathlib import Path; from mathtune.data.check import check_files\n"
            "kb = lambda key: int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1])\n"
            "before = kb('VmRSS:'); r = check_files([Path(sys.argv[1])], lambda p, m: None)\n"
            "print(r.files[0].records, before, kb('VmHWM:'))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True).stdout
    records, before_kb, peak_kb = map(int, out.split())
    assert records == 1_000_000
    assert peak_kb - before_kb < 20_000, (before_kb, peak_kb)  # the file is 98 MB; nothing of it is kept


def test_a_config_names_the_fields_of_records_with_their_own_vocabulary(tmp_path, capsys):
    path = write_jsonl(tmp_path / "own.jsonl", [{"pregunta": "¿2+2?", "respuesta": "4"}, {"pregunta": "¿3+3?"}])
    assert run_check([path]) == 1 and "cannot tell the record shape" in capsys.readouterr().out
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  format: fields\n  fields: {prompt: pregunta, response: respuesta}\n")
    assert main(["data", "check", str(path), "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:2: respuesta: missing (keys present: pregunta)" in out and f"{path} (fields): 2 records, 1 invalid" in out


def test_a_record_too_long_for_the_model_is_a_problem_as_in_training(tmp_path, capsys):
    """The same limit train applies (100 characters per token of data.max_seq_length)."""
    huge = {"instruction": "Sum these: " + "1 + " * 20_000, "output": "\\boxed{20000}"}
    path = write_jsonl(tmp_path / "huge.jsonl", [GOOD, huge])
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  max_seq_length: 1024\n")
    assert run_check([path]) == 1  # default max_seq_length 512: 51,200 characters at most
    assert f"{path}:2: 80,024 characters: far more than data.max_seq_length tokens can hold" in capsys.readouterr().out
    assert run_check([path], config=config) == 0
