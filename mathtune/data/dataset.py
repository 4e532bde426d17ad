"""Load, validate, template and tokenize a dataset; split it into train and eval.

    report = DataReport()
    train_conv, eval_conv = split_conversations(cfg.data, cfg.train.seed, report)   # checked, not tokenized
    train, eval = tokenize_splits(train_conv, eval_conv, tokenizer, cfg.data, report)

Files are JSONL (one record per line, also under a .json name) or one JSON array, UTF-8 with an
optional BOM. Records are parsed with `formats.parse_record`; a bad record is reported with its file,
line (or array index) and field. The conversations go through `datasets` (memory-mapped Arrow on
disk), are rendered with the model's own chat template and tokenized with labels on the assistant's
turns only: each turn's content and its end-of-turn token, never padding.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mathtune.data.formats import Conversation, RecordError, detect_format, parse_record
from mathtune.data.template import render_chat
from mathtune.errors import DataError, MathtuneError
from mathtune.files import unreadable_reason

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from mathtune.config import DataConfig

log = logging.getLogger("mathtune")

IGNORE_INDEX = -100

# Used only when the tokenizer has no chat template and the user names one (model.chat_template).
# "plain" ends each assistant turn with the EOS token so that a base model learns to stop.
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "plain": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
        "{% elif message['role'] == 'user' %}### Question:\n{{ message['content'] }}\n\n"
        "{% else %}### Answer:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Answer:\n{% endif %}"
    ),
}


@dataclass
class DataReport:
    """What happened to the records on their way to training examples."""

    files: dict[str, str] = field(default_factory=dict)
    """file -> detected format"""
    records: int = 0
    skipped_invalid: int = 0
    truncated: int = 0
    dropped_no_labels: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    train_tokens: int = 0
    train_label_tokens: int = 0
    duplicates: list[str] = field(default_factory=list)
    """'FILE:LINE repeats FILE:LINE' for each record identical to an earlier one (kept, warned)."""

    def lines(self) -> list[str]:
        out = [f"  {name}: {fmt}" for name, fmt in self.files.items()]
        out.append(
            f"  {self.records} records -> {self.train_examples} train / {self.eval_examples} eval examples, "
            f"{self.train_tokens} train tokens ({self.train_label_tokens} trained on)"
        )
        if self.duplicates:
            out.append(f"  {len(self.duplicates)} duplicate records (kept), first: {self.duplicates[0]}")
        if self.skipped_invalid:
            out.append(f"  skipped {self.skipped_invalid} invalid records (data.on_invalid: skip)")
        if self.truncated:
            out.append(f"  truncated {self.truncated} examples longer than data.max_seq_length")
        if self.dropped_no_labels:
            out.append(f"  dropped {self.dropped_no_labels} examples with no assistant token left after truncation")
        return out


# ---------------------------------------------------------------------------------------------
# Reading files


# Byte order marks of the encodings Windows tools save by default besides UTF-8 (longest first).
_OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
               (b"\xfe\xff", "UTF-16"))


def read_json_records(
    path: Path, keep_going: bool = False, progress: Callable[[int], None] | None = None
) -> Iterator[tuple[str, Any]]:
    """Yield (place, value) for each record of a JSONL file or a JSON array file.

    JSONL is streamed line by line (bounded memory on large files); a JSON array is read whole.
    Malformed JSON and bad bytes raise DataError naming the line and column; with `keep_going`
    (`mathtune data check`) such a JSONL line is yielded as a RecordError instead and reading goes
    on. `progress` is called with the number of bytes read, for a progress bar.
    """
    reason = unreadable_reason(path)
    if reason:
        raise DataError([f"{path}: {reason}"])
    with path.open("rb") as fh:
        head = fh.read(4096)
    encoding = next((name for bom, name in _OTHER_BOMS if head.startswith(bom)), None)
    if encoding:
        raise DataError([f"{path}: the file is {encoding} text; save it as UTF-8 (in most editors: Save as -> Encoding "
                         "UTF-8)"])
    first = head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1]
    if not first:
        raise DataError([f"{path}: the file is empty; expected JSON records"])
    if first == b"[":
        yield from _read_array(path)
        if progress:
            progress(path.stat().st_size)
    elif first == b"{":
        yield from _read_lines(path, keep_going, progress)
    else:
        raise DataError([f"{path}: expected a JSON array of records or one JSON object per line, starts with {first!r}"])


def _read_array(path: Path) -> Iterator[tuple[str, Any]]:
    text = _decode(path.read_bytes().removeprefix(b"\xef\xbb\xbf"), path, 1)
    try:
        values = parse_json(text)
    except json.JSONDecodeError as exc:
        raise DataError([f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"]) from None
    except RecursionError:
        raise DataError([f"{path}: {TOO_DEEP}"]) from None
    for i, value in enumerate(values):
        yield f"{path} [record {i}]", value


def _read_lines(path: Path, keep_going: bool, progress: Callable[[int], None] | None) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if progress:
                progress(len(raw))
            try:
                line = _decode(raw.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else raw, path, lineno).rstrip()
            except DataError as exc:
                if not keep_going:
                    raise
                yield f"{path}:{lineno}", RecordError("", exc.problems[0].split(": ", 1)[1])
                continue
            if not line.strip():
                continue
            try:
                value = parse_json(line)
            except json.JSONDecodeError as exc:
                if lineno == 1 and exc.msg.startswith(("Expecting", "Unterminated")):
                    _reject_pretty_object(path)
                if keep_going:
                    yield f"{path}:{lineno}:{exc.colno}", RecordError("", f"invalid JSON: {exc.msg}")
                    continue
                raise DataError([f"{path}:{lineno}:{exc.colno}: invalid JSON: {exc.msg}"]) from None
            except RecursionError:
                if keep_going:
                    yield f"{path}:{lineno}", RecordError("", TOO_DEEP)
                    continue
                raise DataError([f"{path}:{lineno}: {TOO_DEEP}"]) from None
            yield f"{path}:{lineno}", value


TOO_DEEP = "JSON nested too deeply to read (thousands of levels of [ or {); records are a few levels deep"


def parse_json(text: str) -> Any:
    """json.loads, except that a number too long for Python's int (over 4,300 digits: it refuses to
    convert them) is read as a float (inf), so that it is judged like any other number, not a crash.
    Raises JSONDecodeError, or RecursionError for nesting deeper than the parser's stack."""
    return json.loads(text, parse_int=_int)


def _int(digits: str) -> int | float:
    return int(digits) if len(digits) <= 4000 else float(digits)


def _reject_pretty_object(path: Path) -> None:
    # A first line that is not a whole object may be one pretty-printed object: say what it is.
    try:
        whole = parse_json(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return
    keys = ", ".join(list(whole)[:5]) if isinstance(whole, dict) else ""
    raise DataError(
        [f"{path}: the file is one JSON object (keys: {keys}); expected an array of records or one record per line"]
    )


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = lineno + raw[: exc.start].count(b"\n")
        raise DataError([f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"]) from None


# ---------------------------------------------------------------------------------------------
# Records -> conversations


# No tokenizer averages this many characters per token: a record longer than this many times
# data.max_seq_length would lose nearly all of itself, answer included, to truncation.
MAX_CHARS_PER_TOKEN = 100


def iter_conversations(
    path: Path, fmt: str = "auto", fields: dict | None = None, max_chars: int | None = None,
    keep_going: bool = False, progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[str, Conversation | RecordError, str]]:
    """Yield (place, conversation or the record's error, format) for every record of one file.

    A conversation longer than `max_chars` characters is an error too: it cannot fit the model.
    `keep_going` and `progress` are passed to `read_json_records`."""
    file_fmt = None if fmt == "auto" else fmt
    for place, record in read_json_records(path, keep_going, progress):
        if isinstance(record, RecordError):  # an unreadable line (keep_going)
            yield place, record, file_fmt or "unknown"
            continue
        if file_fmt is None:
            file_fmt = detect_format(record)
            if file_fmt is None:
                keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    [f"{place}: cannot tell the record shape from its keys ({keys})"],
                    hint="Expected instruction/output, question/answer, prompt/completion, query/response, "
                    "messages or conversations; or set data.format: fields with data.fields: {prompt: ..., response: ...}",
                )
        try:
            conv = parse_record(record, file_fmt, fields)
        except RecordError as exc:
            yield place, exc, file_fmt
            continue
        size = sum(len(m["content"]) for m in conv.messages)
        if max_chars is not None and size > max_chars:
            yield place, RecordError("", f"{size:,} characters: far more than data.max_seq_length tokens can hold; "
                                         "split the record or raise data.max_seq_length"), file_fmt
        else:
            yield place, conv, file_fmt


def _generate_rows(files: list[str], fmt: str, fields: dict | None, system_prompt: str | None, file_ids: list,
                   max_chars: int | None = None) -> Iterator[dict]:
    # file_ids (size, mtime) is unused here: it is in the signature so that datasets' cache key
    # changes when a file changes under the same name.
    for path in files:
        for _, conv, _ in iter_conversations(Path(path), fmt, fields, max_chars):
            if isinstance(conv, Conversation):
                if system_prompt and conv.messages[0]["role"] != "system":
                    conv.messages.insert(0, {"role": "system", "content": system_prompt})
                yield conv.to_row()


def load_conversations(files: list[Path], cfg: DataConfig, report: DataReport) -> datasets.Dataset:
    """Validate every record of `files`, then load the valid ones as a Dataset of conversations."""
    import datasets

    fields = cfg.fields.model_dump() if cfg.fields else None
    max_chars = MAX_CHARS_PER_TOKEN * cfg.max_seq_length
    mapped = {fields["prompt"]: "data.fields.prompt", fields["response"]: "data.fields.response"} if fields else {}
    problems: list[str] = []
    bad = 0
    seen: dict[str, str] = {}  # conversation -> place of its first occurrence
    for path in files:
        fmt = None
        in_file, missing_mapped = 0, []
        for place, conv, fmt in iter_conversations(path, cfg.format, fields, max_chars):
            report.records += 1
            in_file += 1
            if isinstance(conv, RecordError):
                bad += 1
                if conv.field in mapped and str(conv).startswith(f"{conv.field}: missing"):
                    missing_mapped.append(conv)
                if len(problems) < cfg.max_errors:
                    problems.append(f"{place}: {conv}")
                continue
            key = json.dumps(conv.messages, ensure_ascii=False)
            if key in seen:
                report.duplicates.append(f"{place} repeats {seen[key]}")
            else:
                seen[key] = place
        report.files[str(path)] = fmt or "empty"
        if missing_mapped and len(missing_mapped) == in_file:
            first = missing_mapped[0]
            present = str(first).split("keys present: ", 1)[-1].rstrip(")")
            raise DataError([f"{path}: no record has the field '{first.field}' that {mapped[first.field]} names "
                             f"(the first record's keys: {present}); set {mapped[first.field]} to the name this file uses"])
    if report.duplicates:
        shown = "; ".join(report.duplicates[:3]) + (" ..." if len(report.duplicates) > 3 else "")
        log.warning("%d duplicate record%s (kept; remove them if they were not meant to weigh double): %s",
                    len(report.duplicates), "s" * (len(report.duplicates) != 1), shown)
    valid = report.records - bad
    if bad and cfg.on_invalid == "error":
        raise DataError(problems, bad, hint="Fix these records, or set data.on_invalid: skip to leave them out.")
    if not valid:
        raise DataError(problems, bad) if bad else DataError([f"{', '.join(map(str, files))}: no records"])
    report.skipped_invalid += bad

    features = datasets.Features(
        {"messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}], "topic": datasets.Value("string")}
    )
    file_ids = [(os.path.getsize(p), os.stat(p).st_mtime_ns) for p in files]
    return datasets.Dataset.from_generator(
        _generate_rows,
        features=features,
        gen_kwargs={"files": [str(p) for p in files], "fmt": cfg.format, "fields": fields,
                    "system_prompt": cfg.system_prompt, "file_ids": file_ids, "max_chars": max_chars},
    )


# ---------------------------------------------------------------------------------------------
# Conversations -> token ids and labels


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase, fallback: str | None) -> None:
    """Keep the tokenizer's own template; otherwise install the configured fallback or explain."""
    if tokenizer.chat_template:
        return
    if fallback is None:
        raise MathtuneError(
            "The tokenizer has no chat template (a base model?). Set model.chat_template to 'plain' "
            "(### Question / ### Answer, ends answers with EOS), 'chatml', or a Jinja template of your own."
        )
    tokenizer.chat_template = BUILTIN_TEMPLATES.get(fallback, fallback)


def tokenize_conversation(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, max_seq_length: int, train_on_inputs: bool = False
) -> dict[str, Any]:
    """Render with the chat template and tokenize; labels are IGNORE_INDEX outside assistant turns.

    Returns input_ids, labels and `truncated`. Labels are decided by character spans of the
    rendered text, not by token ids, so pad == eos (SmolLM2) cannot mask a real end of turn.
    """
    text = render_chat(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on_inputs:
        labels = list(ids)
    else:
        spans = assistant_spans(messages, tokenizer, text)
        labels = [tok if _inside(start, spans) else IGNORE_INDEX for tok, (start, _) in zip(ids, enc["offset_mapping"])]
    truncated = len(ids) > max_seq_length
    return {"input_ids": ids[:max_seq_length], "labels": labels[:max_seq_length], "truncated": truncated}


def assistant_spans(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, text: str) -> list[tuple[int, int]]:
    """Character spans of `text` that the assistant wrote, each with its end-of-turn marker.

    The usual way: render the conversation up to each assistant turn with the generation prompt;
    what the next render adds is that turn. Templates that rewrite earlier turns (Mistral's puts the
    system prompt into the last user turn) break that prefix property; then each reply is found by
    its content, extended over the EOS token that follows it.
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            return _spans_by_content(messages, tokenizer, text)
        spans.append(_trim(text, len(before), len(through)))
    return spans


def _spans_by_content(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, text: str) -> list[tuple[int, int]]:
    spans, cursor = [], 0
    eos = tokenizer.eos_token or ""
    for message in messages:
        if message["role"] == "system":
            continue  # templates move the system prompt (Mistral: into the last user turn)
        content = message["content"].strip()
        at = text.find(content, cursor)
        if at < 0 and message["role"] == "user":
            continue  # a template may rewrite user text; only the replies must be found
        if at < 0:
            raise MathtuneError("The chat template changes the messages' text; cannot tell which tokens the assistant wrote. "
                                "Set data.train_on_inputs: true or model.chat_template to a simpler template.")
        cursor = at + len(content)
        if message["role"] == "assistant":
            rest = text[cursor:]
            if eos and rest.lstrip().startswith(eos):
                cursor += len(rest) - len(rest.lstrip()) + len(eos)
            spans.append((at, cursor))
    return spans


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    # The newline a template writes after the end-of-turn token is layout, not the assistant's.
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _inside(position: int, spans: list[tuple[int, int]]) -> bool:
    return any(start <= position < end for start, end in spans)


def tokenize_dataset(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                     report: DataReport) -> datasets.Dataset:
    """Tokenize every conversation; drop examples left with no trained token and count them."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        rows = [tokenize_conversation(m, tokenizer, cfg.max_seq_length, cfg.train_on_inputs) for m in batch["messages"]]
        return {key: [row[key] for row in rows] for key in ("input_ids", "labels", "truncated")}

    num_proc = cfg.num_proc or (1 if len(ds) < 20_000 else os.cpu_count())
    tokenized = ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc if num_proc > 1 else None,
                       desc="Tokenizing")
    report.truncated += sum(tokenized["truncated"])
    has_labels = [any(label != IGNORE_INDEX for label in labels) for labels in tokenized["labels"]]
    kept = tokenized.select([i for i, ok in enumerate(has_labels) if ok])
    report.dropped_no_labels += len(tokenized) - len(kept)
    return kept.remove_columns(["truncated"])


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
    from mathtune.data.builtin import builtin_files

    report = report if report is not None else DataReport()
    conversations = load_conversations(cfg.files or builtin_files(), cfg, report)
    if cfg.eval_files:
        return conversations, load_conversations(cfg.eval_files, cfg, report)
    problem = too_few_records(len(conversations), cfg)
    if problem:
        raise DataError([f"{', '.join(map(str, cfg.files or ['the bundled dataset']))}: {problem}"])
    split = conversations.train_test_split(test_size=cfg.eval_fraction, seed=seed)
    return split["train"], split["test"]


def tokenize_splits(
    train_conv: datasets.Dataset, eval_conv: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig, report: DataReport,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    train = tokenize_dataset(train_conv, tokenizer, cfg, report)
    evaluation = tokenize_dataset(eval_conv, tokenizer, cfg, report)
    if len(train) == 0:
        raise DataError(["no training example has an assistant token within data.max_seq_length"])
    report.train_examples, report.eval_examples = len(train), len(evaluation)
    report.train_tokens = sum(map(len, train["input_ids"]))
    report.train_label_tokens = sum(sum(label != IGNORE_INDEX for label in labels) for labels in train["labels"])
    return train, evaluation
