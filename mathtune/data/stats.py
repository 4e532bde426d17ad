"""Look at a dataset before training on it: sizes, languages, lengths, duplicates, answers, topics.

    mathtune data stats my_math.jsonl
    mathtune data stats my_math.jsonl --model ~/models/x.gguf --plot plots/   # token lengths, PNGs
    mathtune data stats my_math.jsonl --json

Streams the records once (`dataset.validate_files`, invalid records counted and skipped) and
keeps fixed-size histograms (exact counts per length value) instead of lists, so memory does not
grow with the number of records, except for two 8-byte hashes per record used to count duplicates
(16 MB per million records).

- Plain text (data.format: text, .txt/.md files): documents, counted in characters and words, and
  in tokens as training packs them (no chat template, an end-of-text token after each).
- Turns: messages other than the system prompt. A question is a user turn, an answer an
  assistant turn; characters and words are counted per turn.
- Tokens: the whole conversation rendered with the model's chat template, as in training
  (`tokenize_conversation`), compared with data.max_seq_length (from --config, default 512).
- Exact duplicates: records whose messages are identical to an earlier record's. Near duplicates:
  not exact, but identical after normalizing case, accents, punctuation, spacing and LaTeX
  commands ("What is 3/4?" vs "what is  3 / 4 ?"). Same question: records whose user turns,
  normalized so, repeat an earlier record's (possibly with another answer).
- Checkable: the last answer has a final answer `verify.reference_answer` can read (\\boxed{},
  "#### 72", "The answer is ...", or an answer that is nothing else: "84", "3/4", "x = 3"); these
  are what `mathtune eval` can score, with the same rule.
- Topic: the record's "topic" field, else the one `topics.conversation_topic` detects.
"""

from __future__ import annotations

import hashlib
import json
import re
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mathtune.config import DataConfig
from mathtune.data.dataset import Parsed, Skipped, validate_files
from mathtune.data.formats import Conversation, Document
from mathtune.data.topics import detect_language, detect_topic, normalize, record_topic
from mathtune.display import png, progress_bar, pyplot, table
from mathtune.errors import DataError
from mathtune.files import write_bytes
from mathtune.verify import reference_answer

TOKEN_BATCH = 256


class Histogram:
    """Exact distribution of non-negative integers as counts per value: memory grows with the
    number of distinct values, not with the number of samples."""

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()

    def add(self, value: int) -> None:
        self.counts[value] += 1

    def __len__(self) -> int:
        return sum(self.counts.values())

    def quantile(self, q: float) -> int:
        """The smallest value with at least a share q of the samples at or below it."""
        total, seen = len(self), 0
        for value in sorted(self.counts):
            seen += self.counts[value]
            if seen >= q * total:
                return value
        raise ValueError("empty histogram")

    def summary(self) -> dict[str, float] | None:
        n = len(self)
        if not n:
            return None
        keys = sorted(self.counts)
        mean = sum(v * c for v, c in self.counts.items()) / n
        return {"count": n, "min": keys[0], "median": self.quantile(0.5), "mean": round(mean, 1),
                "p95": self.quantile(0.95), "max": keys[-1]}

    def above(self, limit: int) -> int:
        return sum(c for v, c in self.counts.items() if v > limit)


@dataclass
class DataStats:
    files: dict[str, str] = field(default_factory=dict)
    records: int = 0
    invalid: int = 0
    skipped: int = 0
    """labelled undesirable (label: false): training leaves them out"""
    notes: list[str] = field(default_factory=list)
    shapes: Counter = field(default_factory=Counter)
    turns: Counter = field(default_factory=Counter)
    """shape -> turns (messages without the system prompt)"""
    languages: Counter = field(default_factory=Counter)
    topics: Counter = field(default_factory=Counter)
    labelled_topics: int = 0
    """records whose topic came from their own "topic" field"""
    checkable: int = 0
    question_chars: Histogram = field(default_factory=Histogram)
    question_words: Histogram = field(default_factory=Histogram)
    answer_chars: Histogram = field(default_factory=Histogram)
    answer_words: Histogram = field(default_factory=Histogram)
    document_chars: Histogram = field(default_factory=Histogram)
    document_words: Histogram = field(default_factory=Histogram)
    tokens: Histogram | None = None
    max_seq_length: int = 512
    exact_duplicates: int = 0
    near_duplicates: int = 0
    same_question: int = 0

    def to_dict(self) -> dict[str, Any]:
        lengths = {name: getattr(self, name).summary() for name in
                   ("question_chars", "question_words", "answer_chars", "answer_words", "document_chars",
                    "document_words")}
        tokens = None
        if self.tokens is not None and len(self.tokens):
            tokens = {**self.tokens.summary(), "max_seq_length": self.max_seq_length,
                      "over_max_seq_length": self.tokens.above(self.max_seq_length)}
        return {
            "files": self.files, "records": self.records, "invalid": self.invalid, "skipped": self.skipped,
            "notes": self.notes,
            "shapes": {s: {"records": n, "turns": self.turns[s]} for s, n in self.shapes.most_common()},
            "languages": dict(self.languages.most_common()),
            "lengths": lengths, "tokens": tokens,
            "duplicates": {"exact": self.exact_duplicates, "near": self.near_duplicates,
                           "same_question": self.same_question},
            "checkable": self.checkable,
            "topics": dict(self.topics.most_common()), "labelled_topics": self.labelled_topics,
        }


_LATEX_COMMAND = re.compile(r"\\[a-zA-Z]+")
_NOT_WORD = re.compile(r"[^\w]+")


def near_key(text: str) -> str:
    """Text reduced for near-duplicate detection: case, accents, punctuation, spacing and LaTeX
    commands ignored; digits and words kept."""
    return " ".join(_NOT_WORD.sub(" ", _LATEX_COMMAND.sub(" ", normalize(text))).split())


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def dataset_stats(paths: list[Path], tokenizer=None, cfg: DataConfig | None = None) -> DataStats:
    """Stream every record of `paths` once, read with the settings of `cfg` (format, fields,
    max_seq_length, ...), and gather the statistics (tokens only with a tokenizer)."""

    cfg = cfg or DataConfig()
    stats = DataStats(max_seq_length=cfg.max_seq_length, tokens=Histogram() if tokenizer is not None else None)
    exact, near, questions = array("Q"), array("Q"), array("Q")
    pending: list[tuple[str, bool]] = []  # (text, is a document) awaiting tokenization
    def on_record(path: Path, place: str, conv: Parsed, shape: str) -> None:
        stats.records += 1
        stats.files[str(path)] = shape
        if not isinstance(conv, (Conversation, Document)):
            stats.skipped += isinstance(conv, Skipped)
            stats.invalid += not isinstance(conv, Skipped)
            return
        if isinstance(conv, Document):
            _count_document(stats, conv, exact, near)
        else:
            _count(stats, conv, shape, exact, near, questions)
        if tokenizer is not None:
            document = isinstance(conv, Document)
            pending.append((conv.text if document else tokenizer.apply_chat_template(conv.messages, tokenize=False),
                            document))
            if len(pending) >= TOKEN_BATCH:
                _count_tokens(stats.tokens, tokenizer, pending)

    validate_files(paths, cfg, on_record, on_note=stats.notes.append,
                   on_file=lambda path, _: stats.files.setdefault(str(path), "empty"),
                   progress=lambda path: progress_bar(path, "Reading"))
    if pending:
        _count_tokens(stats.tokens, tokenizer, pending)
    if stats.records and stats.records == stats.invalid:
        raise DataError([f"{', '.join(map(str, paths))}: every record is invalid; run `mathtune data check` to see why"])
    stats.exact_duplicates = _repeats(exact)
    stats.near_duplicates = _repeats(near) - stats.exact_duplicates
    stats.same_question = _repeats(questions)
    return stats


def _count(stats: DataStats, conv: Conversation, shape: str, exact: array, near: array, questions: array) -> None:
    user = "\n".join(m["content"] for m in conv.messages if m["role"] == "user")
    everything = "\n".join(f"{m['role']}: {m['content']}" for m in conv.messages)
    exact.append(_hash(json.dumps(conv.messages, ensure_ascii=False)))
    near.append(_hash(near_key(everything)))
    questions.append(_hash(near_key(user)))
    body = [m for m in conv.messages if m["role"] != "system"]
    stats.shapes[shape] += 1
    stats.turns[shape] += len(body)
    stats.languages[detect_language("\n".join(m["content"] for m in body))] += 1
    topic = record_topic(conv.topic, conv.messages)
    stats.topics[topic] += 1
    stats.labelled_topics += conv.topic is not None
    for m in body:
        chars, words = (stats.question_chars, stats.question_words) if m["role"] == "user" else (
            stats.answer_chars, stats.answer_words)
        chars.add(len(m["content"]))
        words.add(len(m["content"].split()))
    stats.checkable += reference_answer(body[-1]["content"]) is not None


def _count_document(stats: DataStats, doc: Document, exact: array, near: array) -> None:
    stats.shapes["text"] += 1
    stats.languages[detect_language(doc.text)] += 1
    stats.topics[doc.topic or detect_topic(doc.text)] += 1
    stats.labelled_topics += doc.topic is not None
    stats.document_chars.add(len(doc.text))
    stats.document_words.add(len(doc.text.split()))
    exact.append(_hash(doc.text))
    near.append(_hash(near_key(doc.text)))


def _count_tokens(histogram: Histogram, tokenizer, pending: list[tuple[str, bool]]) -> None:
    # As training tokenizes: a conversation's rendered text with no extra special tokens
    # (dataset.tokenize_conversation); a document with them and its end-of-text token (pack_documents).
    for document in (False, True):
        texts = [text for text, is_document in pending if is_document == document]
        for ids in tokenizer(texts, add_special_tokens=document)["input_ids"] if texts else []:
            histogram.add(len(ids) + (document and (not ids or ids[-1] != tokenizer.eos_token_id)))
    pending.clear()


def _repeats(hashes: array) -> int:
    """How many entries equal an earlier one."""
    import numpy as np

    values = np.frombuffer(hashes, dtype=np.uint64) if len(hashes) else np.zeros(0, dtype=np.uint64)
    return int(len(values) - len(np.unique(values)))


# ---------------------------------------------------------------------------------------------
# Output: terminal tables and PNG plots


def format_stats(stats: DataStats) -> str:
    d = stats.to_dict()
    n = max(stats.records - stats.invalid - stats.skipped, 1)
    documents = stats.shapes["text"]
    out = [f"{stats.records} records in {len(stats.files)} file{'s' * (len(stats.files) != 1)}"
           + (f" ({stats.invalid} invalid, left out: run `mathtune data check`)" if stats.invalid else "")]
    if stats.skipped:
        out.append(f"{stats.skipped} labelled undesirable (label: false), left out as training would")
    out += [*stats.notes, ""]
    out += table([("shape", "records", "turns", "turns/record")] + [
        (s, str(v["records"]), str(v["turns"]), f"{v['turns'] / v['records']:.1f}") for s, v in d["shapes"].items()])
    out += [""] + table([("language", "records", "share")] + [
        (lang, str(c), _pct(c, n)) for lang, c in d["languages"].items()])
    rows = [("length", "count", "min", "median", "mean", "p95", "max")]
    for name, s in d["lengths"].items():
        if s:
            rows.append((name.replace("_", " "), *(str(s[k]) for k in ("count", "min", "median", "mean", "p95", "max"))))
    if d["tokens"]:
        t = d["tokens"]
        rows.append(("tokens/record", *(str(t[k]) for k in ("count", "min", "median", "mean", "p95", "max"))))
    out += [""] + table(rows)
    if d["tokens"] and documents:
        t = d["tokens"]
        total = sum(v * c for v, c in stats.tokens.counts.items())
        out.append(f"documents are packed, not cut off: {total} tokens make {-(-total // t['max_seq_length'])} "
                   f"chunks of max_seq_length {t['max_seq_length']}")
    elif d["tokens"]:
        t = d["tokens"]
        out.append(f"{t['over_max_seq_length']} records ({_pct(t['over_max_seq_length'], n)}) are longer than "
                   f"max_seq_length {t['max_seq_length']} tokens and would be truncated")
    dup = d["duplicates"]
    out += ["", f"duplicates: {dup['exact']} exact, {dup['near']} near (same text up to case, accents, "
                f"punctuation, spacing, LaTeX); {dup['same_question']} repeat an earlier record's question"]
    if n > documents:
        out.append(f"checkable final answers: {stats.checkable} of {n - documents} ({_pct(stats.checkable, n - documents)})")
    out.append("")
    source = (f"{stats.labelled_topics} from the records' topic field, the rest detected"
              if stats.labelled_topics else "detected")
    out += table([("topic", "records", "share")] + [(t, str(c), _pct(c, n)) for t, c in d["topics"].items()])
    out.append(f"(topics: {source})")
    return "\n".join(out)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def write_plots(stats: DataStats, folder: Path) -> list[Path]:
    """lengths.png (token lengths, or words per question/answer without a tokenizer) and topics.png."""

    plt = pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if stats.tokens is not None and len(stats.tokens):
        _hist(ax, stats.tokens, "tokens per record (chat template)")
        ax.axvline(stats.max_seq_length, color="crimson", linestyle="--", label=f"max_seq_length {stats.max_seq_length}")
        ax.legend(frameon=False)
    else:
        for histogram, label in ((stats.question_words, "words per question"), (stats.answer_words, "words per answer"),
                                 (stats.document_words, "words per document")):
            if len(histogram):
                _hist(ax, histogram, label, alpha=0.6)
        ax.legend(frameon=False)
    ax.set_ylabel("count")
    write_bytes(folder / "lengths.png", png(fig))
    written.append(folder / "lengths.png")

    topics = stats.topics.most_common()
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(topics) + 1.2))
    ax.barh([t for t, _ in topics][::-1], [c for _, c in topics][::-1], color="#4c72b0")
    ax.set_xlabel("records")
    ax.set_title("topics")
    write_bytes(folder / "topics.png", png(fig))
    written.append(folder / "topics.png")
    return written


def _hist(ax, histogram: Histogram, label: str, alpha: float = 0.9) -> None:
    values = sorted(histogram.counts)
    if values:
        ax.hist(values, weights=[histogram.counts[v] for v in values], bins=min(50, len(values)),
                label=label, alpha=alpha)
    ax.set_xlabel(label if alpha == 0.9 else "length")


def run_stats(paths: list[Path], tokenizer, cfg: DataConfig, as_json: bool = False,
              plot_dir: Path | None = None) -> DataStats:
    """`mathtune data stats`: print the statistics (or one JSON document); plot them into `plot_dir`."""
    stats = dataset_stats(paths, tokenizer, cfg)
    print(json.dumps(stats.to_dict(), indent=2, ensure_ascii=False) if as_json else format_stats(stats))
    if plot_dir is not None:
        written = write_plots(stats, plot_dir)
        if not as_json:
            print("\nWritten " + ", ".join(map(str, written)))
    return stats
