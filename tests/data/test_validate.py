"""One validation pass (`dataset.validate_files`): `data check`, `data stats` and training refuse
the same files with the same message."""

from __future__ import annotations

from pathlib import Path

import pytest

from mathtune.cli import main
from mathtune.config import DataConfig
from mathtune.data.dataset import DataReport, load_conversations
from mathtune.data.stats import dataset_stats
from mathtune.errors import DataError
from tests.conftest import write_jsonl

NOTES = "# Fracciones\n\nPara sumar 1/2 + 1/3 se busca un denominador común: 3/6 + 2/6 = 5/6.\n"
QA = {"question": "What is 2 + 2?", "answer": "2 + 2 = 4. \\boxed{4}"}


def _mixed_pair(tmp_path: Path) -> tuple[Path, Path]:
    notes = tmp_path / "notes.md"
    notes.write_text(NOTES, encoding="utf-8")
    return notes, write_jsonl(tmp_path / "qa.jsonl", [QA, QA | {"question": "What is 3 + 3?"}])


def _message(notes: Path, qa: Path) -> str:
    return (f"plain text ({notes}) and conversations ({qa}) in one run: text is trained on every token, "
            "conversations on the answers; train on one kind")


def test_data_check_refuses_plain_text_beside_conversations_as_training_does(tmp_path, capsys):
    notes, qa = _mixed_pair(tmp_path)
    assert main(["data", "check", str(notes), str(qa)]) == 1
    out = capsys.readouterr().out
    assert _message(notes, qa) in out
    assert "OK: every record is valid" not in out
    with pytest.raises(DataError) as refused:
        load_conversations([notes, qa], DataConfig(), DataReport())
    assert _message(notes, qa) in str(refused.value)


def test_data_check_json_lists_the_mixed_kind_problem(tmp_path, capsys):
    import json

    notes, qa = _mixed_pair(tmp_path)
    assert main(["data", "check", str(notes), str(qa), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert any(_message(notes, qa) in p["problem"] for p in problems)


def test_data_stats_refuses_the_mixed_kind_pair_with_the_same_message(tmp_path):
    notes, qa = _mixed_pair(tmp_path)
    with pytest.raises(DataError) as refused:
        dataset_stats([notes, qa])
    assert _message(notes, qa) in str(refused.value)


def test_one_kind_alone_still_passes_data_check(tmp_path, capsys):
    notes, qa = _mixed_pair(tmp_path)
    assert main(["data", "check", str(qa)]) == 0
    assert "OK: every record is valid" in capsys.readouterr().out
