"""Load and validate a dataset, and split it into train and eval (data/tokenize.py tokenizes it).

    report = DataReport()
    train_conv, eval_conv = split_conversations(cfg.data, cfg.train.seed, report)   # checked, not tokenized
    train, eval = tokenize_splits(train_conv, eval_conv, tokenizer, cfg.data, report)   # data/tokenize.py

Files are read by `readers.read_records` (JSONL, JSON, CSV/TSV, Parquet, .txt/.md) and every record
is parsed with `formats.parse_record`; a bad record is reported with its file, line (row, or array
index) and field. `validate_files` is the one validation pass: `mathtune data check`, `data stats` and
training read through it, so they accept and refuse the same files. The conversations go through
`datasets` (memory-mapped Arrow on disk); plain-text files (data.format: text) load as documents.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mathtune.config import DataConfig  # the reading settings every record goes through
from mathtune.data.builtin import builtin_files
from mathtune.data.formats import Conversation, Document, RecordError, detect_format, parse_record
from mathtune.data.readers import file_kind, read_records
from mathtune.errors import DataError

if TYPE_CHECKING:
    import datasets

log = logging.getLogger("mathtune")


@dataclass
class DataReport:
    """What happened to the records on their way to training examples."""

    files: dict[str, str] = field(default_factory=dict)
    """file -> detected format"""
    records: int = 0
    skipped_invalid: int = 0
    skipped_undesirable: int = 0
    """records labelled undesirable (KTO-style label: false) left out (data.on_undesirable: skip)"""
    truncated: int = 0
    dropped_no_labels: int = 0
    left_out_unchecked: int = 0
    """GRPO: training problems whose reference has no checkable final answer (nothing to reward)."""
    train_examples: int = 0
    eval_examples: int = 0
    train_tokens: int = 0
    train_label_tokens: int = 0
    text: bool = False
    """Plain-text documents (packed, every token trained), not conversations."""
    notes: list[str] = field(default_factory=list)
    """What the readers decided: a wrapped list's key, preference pairs read for their chosen side."""
    duplicates: list[str] = field(default_factory=list)
    """'FILE:LINE repeats FILE:LINE' for each record identical to an earlier one (kept, warned)."""

    def lines(self) -> list[str]:
        out = [f"  {name}: {fmt}" for name, fmt in self.files.items()]
        out += [f"  {note}" for note in self.notes]
        unit = "chunks" if self.text else "examples"
        out.append(
            f"  {self.records} records -> {self.train_examples} train / {self.eval_examples} eval {unit}"
            + (f", {self.train_tokens} train tokens ({self.train_label_tokens} trained on)" if self.train_tokens else "")
        )
        if self.duplicates:
            out.append(f"  {len(self.duplicates)} duplicate records (kept), first: {self.duplicates[0]}")
        if self.skipped_invalid:
            out.append(f"  skipped {self.skipped_invalid} invalid records (data.on_invalid: skip)")
        if self.skipped_undesirable:
            out.append(f"  left out {self.skipped_undesirable} records labelled undesirable (label: false)")
        if self.truncated:
            out.append(f"  truncated {self.truncated} examples longer than data.max_seq_length")
        if self.dropped_no_labels:
            out.append(f"  dropped {self.dropped_no_labels} examples with no assistant token left after truncation")
        if self.left_out_unchecked:
            out.append(f"  left out {self.left_out_unchecked} problems whose reference has no checkable final answer "
                       "(GRPO rewards final answers only)")
        return out


@dataclass
class Skipped:
    """A valid record left out on purpose: an undesirable example (KTO-style label: false)."""

    reason: str = "labelled undesirable (label: false); data.on_undesirable: train would use it"


# ---------------------------------------------------------------------------------------------
# Records -> conversations


# No tokenizer averages this many characters per token: a record longer than this many times
# data.max_seq_length would lose nearly all of itself, answer included, to truncation.
MAX_CHARS_PER_TOKEN = 100

Parsed = Conversation | Document | RecordError | Skipped


def iter_conversations(
    path: Path, cfg: DataConfig | None = None, max_chars: int | None = None, keep_going: bool = False,
    progress: Callable[[int], None] | None = None, on_note: Callable[[str], None] | None = None,
) -> Iterator[tuple[str, Parsed, str]]:
    """Yield (place, what the record became, format) for every record of one file.

    A record becomes a Conversation (a Document for plain text), its RecordError, or Skipped. A
    conversation longer than `max_chars` characters is an error too: it cannot fit the model (a
    document is cut into chunks instead). `keep_going`, `progress` and `on_note` are passed to
    `readers.read_records`; `on_note` also hears that preference pairs are read for their chosen side."""
    cfg = cfg or DataConfig()
    fields = cfg.fields.model_dump() if cfg.fields else None
    kind = file_kind(path)
    file_fmt = None if cfg.format == "auto" else cfg.format
    if kind == "text":
        if file_fmt not in (None, "text"):
            raise DataError([f"{path}: a plain-text file, but data.format is '{cfg.format}'; use data.format: "
                             "text (or auto), and give question/answer records in another file"])
        file_fmt = "text"
    for place, record in read_records(path, cfg.documents, keep_going, progress, on_note):
        if isinstance(record, RecordError):  # an unreadable line (keep_going) or a ragged CSV row
            yield place, record, file_fmt or "unknown"
            continue
        if file_fmt is None:
            file_fmt = _detect(place, record, kind)
            if file_fmt == "preference":
                _accept_preference(path, place, cfg, on_note)
        try:
            conv = parse_record(record, file_fmt, fields)
        except RecordError as exc:
            yield place, _as_column(exc) if kind == "table" else exc, file_fmt
            continue
        if cfg.preference == "pairs" and isinstance(conv, Conversation) and conv.rejected is None:
            yield place, RecordError("", "not a preference pair (chosen and rejected answers): DPO (train.method: dpo) "
                                         "learns from pairs only"), file_fmt
            continue
        if conv.desirable is False and cfg.on_undesirable == "skip":
            yield place, Skipped(), file_fmt
            continue
        size = sum(len(m["content"]) for m in conv.messages) if isinstance(conv, Conversation) else 0
        if max_chars is not None and size > max_chars:
            yield place, RecordError("", f"{size:,} characters: far more than data.max_seq_length tokens can hold; "
                                         "split the record or raise data.max_seq_length"), file_fmt
        else:
            yield place, conv, file_fmt


def _detect(place: str, record: Any, kind: str) -> str:
    fmt = detect_format(record)
    if fmt is not None:
        return fmt
    keys = [str(k) for k in record] if isinstance(record, dict) else []
    names = "columns" if kind == "table" else "keys"
    shown = ", ".join(keys) if keys else type(record).__name__
    pair = f"{{prompt: {keys[0]}, response: {keys[1]}}}" if len(keys) == 2 else "{prompt: ..., response: ...}"
    raise DataError(
        [f"{place}: cannot tell the record shape from its {names} ({shown})"],
        hint="Expected instruction/output, question/answer, prompt/completion, query/response, messages, "
        f"conversations or text; or set data.format: fields with data.fields: {pair}",
    )


def _accept_preference(path: Path, place: str, cfg: DataConfig, on_note: Callable[[str], None] | None) -> None:
    if cfg.preference is None:
        raise DataError([f"{place}: preference data (chosen/rejected pairs): DPO learns from them, SFT and GRPO from "
                         "answers to imitate or check"],
                        hint="Train with --method dpo (train.method: dpo), or set data.preference: chosen to train by SFT "
                        "on the chosen answers (the rejected ones are left out).")
    if on_note and cfg.preference == "chosen":
        on_note(f"{path}: preference pairs: training on the chosen answers, the rejected ones are left out "
                "(data.preference: chosen)")
    elif on_note:
        on_note(f"{path}: preference pairs: the chosen answer over the rejected one (train.method: dpo)")


def _as_column(exc: RecordError) -> RecordError:
    """A table's record error names the column: "column 'respuesta': is empty"."""
    if not exc.field:
        return exc
    cut = min((i for i in (exc.field.find("."), exc.field.find("[")) if i >= 0), default=len(exc.field))
    message = str(exc).removeprefix(f"{exc.field}: ").replace("(keys present:", "(columns:")
    return RecordError(f"column '{exc.field[:cut]}'{exc.field[cut:]}", message)


def _generate_rows(files: list[str], cfg: dict, file_ids: list, max_chars: int | None = None) -> Iterator[dict]:
    # file_ids (size, mtime) is unused here: it is in the signature so that datasets' cache key
    # changes when a file changes under the same name. cfg is DataConfig's JSON dump (hashable).
    data = DataConfig.model_validate(cfg)
    for path in files:
        for _, conv, _ in iter_conversations(Path(path), data, max_chars):
            if isinstance(conv, Conversation):
                if data.system_prompt:
                    for side in filter(None, (conv.messages, conv.rejected)):
                        if side[0]["role"] != "system":
                            side.insert(0, {"role": "system", "content": data.system_prompt})
                yield conv.to_row(pairs=data.preference == "pairs")
            elif isinstance(conv, Document):
                yield conv.to_row()


FileHandler = Callable[[Path, str | None], None]


def validate_files(
    paths: list[Path], cfg: DataConfig | None, on_record: Callable[[Path, str, Parsed, str], None],
    max_chars: int | None = None, keep_going: bool = False, on_note: Callable[[str], None] | None = None,
    on_file: FileHandler | None = None, on_file_error: Callable[[Path, DataError], None] | None = None,
    progress: Callable[[Path], AbstractContextManager] | None = None,
) -> None:
    """The one validation pass of `mathtune data check`, `data stats` and training.

    Reads every record of `paths` with `iter_conversations` and calls on_record(path, place, parsed,
    format) for each, then on_file(path, format) after each file (format None when it held no
    record). A whole-file problem goes to `on_file_error` when given (checking reports it and goes
    on), else it is raised. `progress(path)` opens a context giving the reader's progress callback.
    Raises DataError when plain-text and conversation files are mixed: they train differently."""
    text_files, conversation_files = [], []
    for path in paths:
        fmt = None
        try:
            with (progress(path) if progress else nullcontext()) as bar:
                for place, conv, fmt in iter_conversations(path, cfg, max_chars, keep_going, bar, on_note):
                    on_record(path, place, conv, fmt)
        except DataError as exc:
            if on_file_error is None:
                raise
            on_file_error(path, exc)
            continue
        if on_file is not None:
            on_file(path, fmt)
        (text_files if fmt == "text" else conversation_files).append(str(path))
    if text_files and conversation_files:
        raise DataError([f"plain text ({', '.join(text_files)}) and conversations ({', '.join(conversation_files)}) "
                         "in one run: text is trained on every token, conversations on the answers; train on one kind"])


@dataclass
class _Tally:
    """What training's loader counts while validate_files reads: bad records, duplicates, and the
    records that lack a field data.fields names (all of a file's records: the mapping is wrong)."""

    cfg: DataConfig
    report: DataReport
    mapped: dict[str, str]
    problems: list[str] = field(default_factory=list)
    bad: int = 0
    skipped: int = 0
    in_file: int = 0
    missing_mapped: list[RecordError] = field(default_factory=list)
    seen: dict[str, str] = field(default_factory=dict)  # conversation -> place of its first occurrence

    def record(self, path: Path, place: str, conv: Parsed, fmt: str) -> None:
        self.report.records += 1
        self.in_file += 1
        if isinstance(conv, Skipped):
            self.skipped += 1
            return
        if isinstance(conv, RecordError):
            self.bad += 1
            if conv.field in self.mapped and str(conv).startswith(f"{conv.field}: missing"):
                self.missing_mapped.append(conv)
            if len(self.problems) < self.cfg.max_errors:
                self.problems.append(f"{place}: {conv}")
            return
        key = conv.text if isinstance(conv, Document) else json.dumps(conv.messages, ensure_ascii=False)
        if key in self.seen:
            self.report.duplicates.append(f"{place} repeats {self.seen[key]}")
        else:
            self.seen[key] = place

    def file_done(self, path: Path, fmt: str | None) -> None:
        self.report.files[str(path)] = fmt or "empty"
        self.report.text = self.report.text or fmt == "text"
        missing, self.missing_mapped, in_file, self.in_file = self.missing_mapped, [], self.in_file, 0
        if missing and len(missing) == in_file:
            first = missing[0]
            present = str(first).split("keys present: ", 1)[-1].rstrip(")")
            raise DataError([f"{path}: no record has the field '{first.field}' that {self.mapped[first.field]} names "
                             f"(the first record's keys: {present}); set {self.mapped[first.field]} to the name this file uses"])


def load_conversations(files: list[Path], cfg: DataConfig, report: DataReport) -> datasets.Dataset:
    """Validate every record of `files`, then load the valid ones as a Dataset of conversations
    (messages, topic) or, for plain text, of documents (text, topic)."""
    fields = cfg.fields.model_dump() if cfg.fields else None
    max_chars = MAX_CHARS_PER_TOKEN * cfg.max_seq_length
    mapped = {fields["prompt"]: "data.fields.prompt", fields["response"]: "data.fields.response"} if fields else {}
    tally = _Tally(cfg, report, mapped)
    report.text = False
    validate_files(files, cfg, tally.record, max_chars, on_note=report.notes.append, on_file=tally.file_done)
    _warn(report, tally.skipped)
    valid = report.records - tally.bad - tally.skipped
    if tally.bad and cfg.on_invalid == "error":
        raise DataError(tally.problems, tally.bad, hint="Fix these records, or set data.on_invalid: skip to leave them out.")
    if not valid:
        if tally.bad:
            raise DataError(tally.problems, tally.bad)
        raise DataError([f"{', '.join(map(str, files))}: no records to train on"])
    report.skipped_invalid += tally.bad
    report.skipped_undesirable += tally.skipped
    return _dataset(files, cfg, report.text, max_chars)


def _dataset(files: list[Path], cfg: DataConfig, text: bool, max_chars: int) -> datasets.Dataset:
    import datasets

    string = datasets.Value("string")
    turns = [{"role": string, "content": string}]
    body = {"text": string} if text else {"messages": turns}
    if cfg.preference == "pairs":
        body["rejected"] = turns
    file_ids = [(os.path.getsize(p), os.stat(p).st_mtime_ns) for p in files]
    return datasets.Dataset.from_generator(
        _generate_rows,
        features=datasets.Features({**body, "topic": string}),
        gen_kwargs={"files": [str(p) for p in files], "cfg": cfg.model_dump(mode="json"), "file_ids": file_ids,
                    "max_chars": max_chars},
    )


def _warn(report: DataReport, skipped: int) -> None:
    if skipped:
        log.warning("%d record%s labelled undesirable (label: false) left out: they show what not to answer. "
                    "Set data.on_undesirable: train to train on them as ordinary examples.", skipped, "s" * (skipped != 1))
    if report.duplicates:
        shown = "; ".join(report.duplicates[:3]) + (" ..." if len(report.duplicates) > 3 else "")
        log.warning("%d duplicate record%s (kept; remove them if they were not meant to weigh double): %s",
                    len(report.duplicates), "s" * (len(report.duplicates) != 1), shown)


# ---------------------------------------------------------------------------------------------
# The train/eval split


def too_few_records(valid: int, cfg: DataConfig) -> str | None:
    """The one dataset-wide rule (also checked by `mathtune data check`): without data.eval_files one
    record is held out, so training needs two."""
    if cfg.eval_files or valid >= 2:
        return None
    return (f"only {valid} valid record{'s' * (valid != 1)}: need at least 2 to hold one out for evaluation "
            "(or give data.eval_files)")


def split_conversations(cfg: DataConfig, seed: int,
                        report: DataReport | None = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The train and eval conversations: cfg.files (or the bundled set) split by seed, or cfg.eval_files.

    Deterministic for a given seed, so evaluation after training sees the same held-out records.
    """

    report = report if report is not None else DataReport()
    conversations = load_conversations(cfg.files or builtin_files(), cfg, report)
    if cfg.eval_files:
        text = report.text
        evaluation = load_conversations(cfg.eval_files, cfg, report)
        if report.text != text:
            kinds = ("plain text", "conversations") if text else ("conversations", "plain text")
            raise DataError([f"data.eval_files hold {kinds[1]} but data.files hold {kinds[0]}: evaluate on the kind "
                             "you train on"])
        return conversations, evaluation
    problem = too_few_records(len(conversations), cfg)
    if problem:
        raise DataError([f"{', '.join(map(str, cfg.files or ['the bundled dataset']))}: {problem}"])
    split = conversations.train_test_split(test_size=cfg.eval_fraction, seed=seed)
    return split["train"], split["test"]
