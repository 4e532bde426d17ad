"""Data files -> (place, record) pairs, whatever the file kind; the parsers in formats.py take it from there.

    for place, record in read_records(Path("pares.csv")):   # ("pares.csv row 2", {"pregunta": ..., "respuesta": ...})
        ...

- JSONL (one object per line, also under a .json name): streamed line by line, memory stays flat.
- A JSON array of records, or a JSON object holding exactly one list of records (`{"data": [...]}`,
  `{"train": [...]}`): read whole.
- CSV and TSV (column names as keys, every cell as text): streamed with Python's csv reader, which
  gives exact spreadsheet row numbers (header = row 1, a cell with line breaks is still one row) and
  sees rows with a missing or extra cell. pandas, which `datasets` uses for CSV, turns such a row
  into an index column or drops the extra cell without a word, and reads "007" as the number 7.
  The separator is `,` or `;` (Spanish Excel), whichever the header uses; tab for .tsv.
- Parquet: pyarrow (the reader under `datasets`), in batches of PARQUET_BATCH rows.
- .txt/.md: plain-text documents, yielded as {"text": ...} records: the whole file, or each block
  between blank lines (data.documents).
- Excel and other spreadsheet workbooks are refused with "save it as CSV".

Every value is UTF-8 (an optional BOM is dropped); a file that is not says where and how to fix it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mathtune.data.formats import RecordError, detect_format
from mathtune.errors import DataError
from mathtune.files import unreadable_reason

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
WORKBOOK_SUFFIXES = (".xlsx", ".xlsm", ".xls", ".ods", ".numbers")
PARQUET_BATCH = 1024

Progress = Callable[[int], None]
Note = Callable[[str], None]


def file_kind(path: Path) -> str:
    """'text', 'table' or 'json', from the file name."""
    suffix = path.suffix.lower()
    return "text" if suffix in TEXT_SUFFIXES else "table" if suffix in TABLE_SUFFIXES else "json"


def read_records(path: Path, documents: str = "file", keep_going: bool = False, progress: Progress | None = None,
                 on_note: Note | None = None) -> Iterator[tuple[str, Any]]:
    """Yield (place, record) for every record of one file of any supported kind.

    `documents` ('file' or 'blocks') cuts text files; `keep_going` (data check) yields an unreadable
    JSONL line as a RecordError instead of raising; `progress` gets byte counts; `on_note` hears
    what the reader decided (the key a wrapped list was found under)."""
    reason = unreadable_reason(path)
    if reason:
        raise DataError([f"{path}: {reason}"])
    suffix = path.suffix.lower()
    if suffix in WORKBOOK_SUFFIXES:
        raise DataError([f"{path}: a spreadsheet workbook ({suffix}); mathtune reads CSV, TSV, Parquet, JSON and JSONL. "
                         "Save it as CSV: File > Save As > 'CSV UTF-8 (comma delimited)' (one sheet, the first row "
                         "holding the column names)"])
    if suffix != ".parquet":
        _refuse_other_encodings(path)
    kind = file_kind(path)
    if kind == "text":
        records = _read_text(path, documents)
    elif suffix == ".parquet":
        records = _read_parquet(path)
    elif kind == "table":
        records = _read_csv(path, "\t" if suffix == ".tsv" else None)
    else:
        yield from read_json_records(path, keep_going, progress, on_note)
        return
    yield from records
    if progress:
        progress(path.stat().st_size)


# Byte order marks of the encodings Windows tools save besides UTF-8 (Excel's "Unicode text": UTF-16).
_OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
               (b"\xfe\xff", "UTF-16"))


def _refuse_other_encodings(path: Path) -> None:
    with path.open("rb") as fh:
        head = fh.read(4)
    encoding = next((name for bom, name in _OTHER_BOMS if head.startswith(bom)), None)
    if encoding:
        raise DataError([f"{path}: the file is {encoding} text; save it as UTF-8 (in most editors: Save as -> "
                         "Encoding UTF-8)"])


# ---------------------------------------------------------------------------------------------
# JSON and JSONL

TOO_DEEP = "JSON nested too deeply to read (thousands of levels of [ or {); records are a few levels deep"


def parse_json(text: str) -> Any:
    """json.loads, except that a number too long for Python's int (over 4,300 digits: it refuses to
    convert them) is read as a float (inf), so that it is judged like any other number, not a crash.
    Raises JSONDecodeError, or RecursionError for nesting deeper than the parser's stack."""
    return json.loads(text, parse_int=_int)


def _int(digits: str) -> int | float:
    return int(digits) if len(digits) <= 4000 else float(digits)


def read_json_records(path: Path, keep_going: bool = False, progress: Progress | None = None,
                      on_note: Note | None = None) -> Iterator[tuple[str, Any]]:
    """Yield (place, value) for each record of a JSONL file, a JSON array file or a one-list wrapper.

    Malformed JSON and bad bytes raise DataError naming the line and column; with `keep_going` such
    a JSONL line is yielded as a RecordError instead and reading goes on."""
    with path.open("rb") as fh:
        head = fh.read(4096)
    first = head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1]
    if not first:
        raise DataError([f"{path}: the file is empty; expected JSON records"])
    if first == b"[":
        yield from _numbered(path, _load_whole(path), "record {}")
        if progress:
            progress(path.stat().st_size)
    elif first == b"{":
        yield from _read_lines(path, keep_going, progress, on_note)
    else:
        raise DataError([f"{path}: expected a JSON array of records or one JSON object per line, starts with {first!r}"])


def _load_whole(path: Path) -> Any:
    text = _decode(path.read_bytes().removeprefix(b"\xef\xbb\xbf"), path, 1)
    try:
        return parse_json(text)
    except json.JSONDecodeError as exc:
        raise DataError([f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}"]) from None
    except RecursionError:
        raise DataError([f"{path}: {TOO_DEEP}"]) from None


def _numbered(path: Path, values: list, label: str) -> Iterator[tuple[str, Any]]:
    for i, value in enumerate(values):
        yield f"{path} [{label.format(i)}]", value


def _read_lines(path: Path, keep_going: bool, progress: Progress | None, on_note: Note | None) -> Iterator[tuple[str, Any]]:
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
            except RecursionError:
                if keep_going:
                    yield f"{path}:{lineno}", RecordError("", TOO_DEEP)
                    continue
                raise DataError([f"{path}:{lineno}: {TOO_DEEP}"]) from None
            except json.JSONDecodeError as exc:
                whole = _whole_object(path) if lineno == 1 and exc.msg.startswith(("Expecting", "Unterminated")) else None
                if isinstance(whole, dict):  # not one object per line: one pretty-printed object
                    yield from _unwrap(path, whole, on_note)
                    return
                if keep_going:
                    yield f"{path}:{lineno}:{exc.colno}", RecordError("", f"invalid JSON: {exc.msg}")
                    continue
                raise DataError([f"{path}:{lineno}:{exc.colno}: invalid JSON: {exc.msg}"]) from None
            if lineno == 1 and isinstance(value, dict) and detect_format(value) is None and _record_lists(value) \
                    and _single_line(path):
                # `json.dump(wrapper, f)` writes the whole wrapper on one line.
                yield from _unwrap(path, value, on_note)
                return
            yield f"{path}:{lineno}", value


def _whole_object(path: Path) -> Any:
    try:
        return parse_json(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        # Not one object either: report the first line's error as for any JSONL file.
        return None


def _single_line(path: Path) -> bool:
    with path.open("rb") as fh:
        fh.readline()
        return not any(line.strip() for line in fh)


def _record_lists(value: dict) -> list[str]:
    """The keys of `value` that hold a non-empty list of JSON objects."""
    return [key for key, item in value.items()
            if isinstance(item, list) and item and all(isinstance(r, dict) for r in item)]


def _unwrap(path: Path, whole: dict, on_note: Note | None) -> Iterator[tuple[str, Any]]:
    """The records of a JSON object holding exactly one list of records; anything else is explained."""
    keys = _record_lists(whole)
    if len(keys) != 1:
        several = f" holding {len(keys)} lists of records ({', '.join(keys)}): give one per file" if keys else ""
        raise DataError([f"{path}: the file is one JSON object (keys: {', '.join(list(whole)[:5])}){several}; expected "
                         "an array of records or one record per line"])
    key = keys[0]
    if on_note:
        on_note(f"{path}: the records are the list under '{key}' ({len(whole[key])} records; the file is read whole)")
    yield from _numbered(path, whole[key], f"{key}[{{}}]")


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = lineno + raw[: exc.start].count(b"\n")
        raise DataError([f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"]) from None


# ---------------------------------------------------------------------------------------------
# Tables: CSV, TSV, Parquet


def _read_csv(path: Path, sep: str | None) -> Iterator[tuple[str, Any]]:
    row = 0
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            header_line = fh.readline()
            if not header_line.strip():
                raise DataError([f"{path}: the file is empty or its first row is blank; expected the column names "
                                 "(e.g. pregunta,respuesta) in row 1"])
            sep = sep or max(",;", key=header_line.count)
            fh.seek(0)
            reader = csv.reader(_skip_bom(fh), delimiter=sep)
            columns = next(reader)
            row = 1
            _check_columns(path, columns)
            for cells in reader:
                row += 1
                if not any(cell.strip() for cell in cells):
                    continue  # a blank row, such as the trailing ",,," spreadsheets write, is no record
                if len(cells) != len(columns):
                    yield f"{path} row {row}", RecordError("", _cell_count_problem(cells, columns, sep))
                    continue
                yield f"{path} row {row}", dict(zip(columns, cells))
    except UnicodeDecodeError:
        # The text layer decodes ahead of the rows it hands out: find the bad byte's line in the bytes.
        try:
            _decode(path.read_bytes(), path, 1)
        except DataError as exc:
            raise DataError([exc.problems[0].replace("save the file as UTF-8", "in Excel save it as 'CSV UTF-8 (comma "
                                                     "delimited)', in LibreOffice tick 'UTF-8' when saving")]) from None
        raise
    except csv.Error as exc:
        raise DataError([f"{path} row {row + 1}: not readable as CSV: {exc}"]) from None


def _skip_bom(fh: io.TextIOBase) -> io.TextIOBase:
    # seek(0) on a utf-8-sig stream rereads the BOM as U+FEFF; drop it from the first column name.
    first = fh.read(1)
    if first != "\ufeff":
        fh.seek(0)
    return fh


def _check_columns(path: Path, columns: list[str]) -> None:
    repeated = sorted({c for c in columns if columns.count(c) > 1 and c.strip()})
    if repeated:
        raise DataError([f"{path} row 1: the column name{'s' * (len(repeated) > 1)} {', '.join(repeated)} appear"
                         f"{'s' * (len(repeated) == 1)} more than once; each column needs its own name"])


def _cell_count_problem(cells: list[str], columns: list[str], sep: str) -> str:
    shown = "tab" if sep == "\t" else repr(sep)
    if len(cells) > len(columns):
        return (f"{len(cells)} cells, but the header has {len(columns)} columns ({', '.join(columns)}): a cell "
                f"holding the separator {shown} must be in double quotes")
    return f"{len(cells)} cells, but the header has {len(columns)} columns ({', '.join(columns)})"


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError([f"{path}: not a readable Parquet file: {exc}"]) from None
    index = 0
    for batch in table.iter_batches(batch_size=PARQUET_BATCH):
        for record in batch.to_pylist():
            # Columns a row does not use are null in Parquet, absent in the other file kinds.
            yield f"{path} [row {index}]", {k: v for k, v in record.items() if v is not None}
            index += 1


# ---------------------------------------------------------------------------------------------
# Plain text


def _read_text(path: Path, documents: str) -> Iterator[tuple[str, Any]]:
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    text = _decode(raw, path, 1).replace("\r\n", "\n")
    if not text.strip():
        raise DataError([f"{path}: the file is empty; expected plain text"])
    if documents == "file":
        yield str(path), {"text": text.strip()}
        return
    block: list[str] = []
    start = 0
    for lineno, line in enumerate([*text.split("\n"), ""], start=1):
        if line.strip():
            start = start or lineno
            block.append(line)
        elif block:
            yield f"{path}:{start}", {"text": "\n".join(block).strip()}
            block, start = [], 0
