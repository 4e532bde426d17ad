"""Validate data files without training: every problem, with its place.

    mathtune data check my_math.jsonl more.json          # exit 1 when any record is invalid
    mathtune data check big.jsonl --json > problems.json
    mathtune data check pares.csv notas.md --config run.yaml   # data.format, data.fields, data.preference ...

The records go through the same validation pass as training (`dataset.validate_files`), so files
that pass here load in `mathtune train`, and files training refuses together (plain text beside
conversations) are refused here. Unlike training,
checking does not stop at the first unreadable JSONL line: it reports it and goes on. JSONL is
streamed, so memory stays flat on files of millions of records (a JSON array file is read whole);
problems are printed as they are found, or collected for --json. A progress bar (stderr) shows on
files over PROGRESS_MIN_BYTES. CSV, TSV and Parquet are streamed too (see readers.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mathtune.config import load_config
from mathtune.data.dataset import MAX_CHARS_PER_TOKEN, Parsed, Skipped, too_few_records, validate_files
from mathtune.data.formats import Conversation, RecordError
from mathtune.display import progress_bar
from mathtune.errors import DataError
from mathtune.verify import reference_answer

if TYPE_CHECKING:
    from mathtune.config import DataConfig


@dataclass
class FileCheck:
    path: str
    format: str | None = None
    records: int = 0
    invalid: int = 0
    skipped: int = 0
    """Valid records training leaves out: labelled undesirable (label: false)."""
    notes: list[str] = field(default_factory=list)
    """What the reader decided (the key of a wrapped list, preference pairs read for their chosen side)."""
    error: str | None = None
    """A problem with the whole file (missing, empty, not JSON, unknown record shape)."""
    pairs: int = 0
    """Valid preference pairs (chosen and rejected): what DPO learns from."""
    checkable: int = 0
    """Valid conversations whose last answer has a final answer the verifier can check: GRPO's problems."""

    def fit_for(self) -> str:
        """Which training methods this file's valid records serve (train.method)."""
        valid = self.records - self.invalid - self.skipped
        if self.format == "text":
            return "sft (plain text)"
        if not valid:
            return "nothing (no valid record)"
        methods = [f"dpo ({self.pairs} pairs)"] if self.pairs else []
        methods.append("sft" + (" on the chosen answers (data.preference: chosen)" if self.pairs else ""))
        if self.checkable:
            methods.append(f"grpo ({self.checkable} of {valid} with a checkable final answer)")
        return ", ".join(methods)


@dataclass
class CheckReport:
    files: list[FileCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """Problems of the files together (too few records to train on)."""

    @property
    def ok(self) -> bool:
        return all(f.invalid == 0 and f.error is None for f in self.files) and not self.problems

    def to_dict(self, problems: list[dict] | None = None) -> dict:
        out = {"ok": self.ok, "records": sum(f.records for f in self.files),
               "invalid": sum(f.invalid for f in self.files),
               "files": [{**asdict(f), "fit_for": f.fit_for()} for f in self.files]}
        if problems is not None:
            out["problems"] = problems
        return out


def check_files(paths: list[Path], on_problem: Callable[[str, str], None], cfg: DataConfig | None = None,
                max_chars: int | None = None) -> CheckReport:
    """Validate every record of `paths` read with the settings of `cfg` (format, fields, ...); call
    on_problem(place, message) for each problem found. A record over `max_chars` characters is a
    problem, as training would find it."""
    report = CheckReport()
    checks: dict[Path, FileCheck] = {}

    def check(path: Path) -> FileCheck:
        if path not in checks:
            checks[path] = FileCheck(str(path))
            report.files.append(checks[path])
        return checks[path]

    def on_record(path: Path, place: str, conv: Parsed, fmt: str) -> None:
        result = check(path)
        result.format = fmt
        result.records += 1
        result.skipped += isinstance(conv, Skipped)
        if isinstance(conv, RecordError):
            result.invalid += 1
            on_problem(place, str(conv))
        elif isinstance(conv, Conversation):
            result.pairs += conv.rejected is not None
            result.checkable += reference_answer(conv.messages[-1]["content"]) is not None

    def on_file_error(path: Path, exc: DataError) -> None:
        # Whole-file problems: the message already names the file (and line where there is one).
        check(path).error = str(exc)
        on_problem(str(path), str(exc).removeprefix(f"{path}: "))

    def opened(path: Path) -> AbstractContextManager:
        current[:] = [check(path)]  # listed in the order given, records or not; notes go to it
        return progress_bar(path, "Checking")

    current: list[FileCheck] = []

    try:
        validate_files(paths, cfg, on_record, max_chars, keep_going=True, on_note=lambda note: current[0].notes.append(note),
                       on_file_error=on_file_error, progress=opened)
    except DataError as exc:  # files that training refuses together (plain text beside conversations)
        report.problems.append(str(exc))
        on_problem(", ".join(map(str, paths)), str(exc))
    return report


def say(text: str) -> None:
    """print, escaping what stdout cannot encode: a record may hold anything (an unpaired surrogate
    in a key; on Windows, characters the console's code page lacks)."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding))


def run_check(paths: list[Path], as_json: bool = False, config: Path | None = None, overrides: dict | None = None) -> int:
    """`mathtune data check`: print the problems (or one JSON document); 0 if all valid, 1 otherwise.
    `config` and `overrides` give the data settings (data.format and data.fields for records with
    field names of their own, data.documents, data.preference, ...)."""

    data = load_config(config, overrides, check_machine=False).data
    # Preference pairs are checked whatever the method; what each file is fit for is said below.
    implied = data.preference is None
    if implied:
        data = data.model_copy(update={"preference": "chosen"})
    problems: list[dict] = []
    if as_json:
        def on_problem(place: str, message: str) -> None:
            problems.append({"place": place, "problem": message})
    else:
        def on_problem(place: str, message: str) -> None:
            say(f"{place}: {message}")

    report = check_files(paths, on_problem, data, MAX_CHARS_PER_TOKEN * data.max_seq_length)
    if implied:  # read for their chosen side only to be checked: not what training will do
        for f in report.files:
            f.notes = [note for note in f.notes if not note.endswith("(data.preference: chosen)")]
    valid = sum(f.records - f.invalid - f.skipped for f in report.files)
    if not any(f.error for f in report.files) and (problem := too_few_records(valid, data)):
        report.problems.append(problem)  # what training would say about these files
        on_problem(", ".join(map(str, paths)), problem)
    if as_json:
        say(json.dumps(report.to_dict(problems), indent=2, ensure_ascii=False))
    else:
        for f in report.files:
            if f.error:
                say(f"{f.path}: not checked: {f.error.splitlines()[0].removeprefix(f'{f.path}: ')}")
            else:
                status = f"{f.invalid} invalid" if f.invalid else "all valid"
                if f.skipped:
                    status += (f"; {f.skipped} labelled undesirable (label: false) will be left out "
                               "(data.on_undesirable: train to use them)")
                say(f"{f.path} ({f.format or 'no records'}): {f.records} records, {status}")
                for note in f.notes:
                    say(f"  {note.removeprefix(f'{f.path}: ')}")
                say(f"  fit for: {f.fit_for()}")
        bad = sum(f.invalid for f in report.files) + sum(f.error is not None for f in report.files) + len(report.problems)
        say("OK: every record is valid" if report.ok else f"{bad} problem{'s' * (bad != 1)} found")
    return 0 if report.ok else 1
