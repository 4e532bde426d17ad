"""LM Studio's models: find them, train one by a piece of its name, and send the fine-tune back.

    mathtune models                    # every GGUF LM Studio keeps: architecture, size, trainable?, cached?
    mathtune models --cache            # mathtune's converted copies (folder, source file, size)
    mathtune models --remove NAME      # delete one converted copy
    mathtune train --model mathstral   # a unique piece of a listed model's name
    mathtune export runs/x --to lmstudio

LM Studio keeps its downloads as `<models folder>/<publisher>/<model>/<file>.gguf`. The models
folder is `~/.lmstudio/models` (older versions: `~/.cache/lm-studio/models`) on Linux and macOS, and
`%USERPROFILE%\\.lmstudio\\models` on Windows; one moved elsewhere in LM Studio's settings is named
with `MATHTUNE_LMSTUDIO_DIR`.

Listing reads each file's header only (mathtune/model/gguf.py: milliseconds a file). The converted
copies that `--cache` lists and `--remove` deletes are the ones mathtune/model/cache.py writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from mathtune.display import table
from mathtune.errors import ModelError
from mathtune.files import cache_root
from mathtune.model.cache import cache_folder
from mathtune.model.gguf import GgufHeader, gguf_architecture_supported, read_header

ENV_DIR = "MATHTUNE_LMSTUDIO_DIR"
# Relative to the home folder: the current default first, then the one older versions used.
HOME_DIRS = (Path(".lmstudio") / "models", Path(".cache") / "lm-studio" / "models")
SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
PROJECTOR = re.compile(r"mmproj|projector", re.IGNORECASE)  # vision encoders shipped beside a model
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Where LM Studio keeps models


def candidate_dirs(environ: Mapping[str, str] | None = None, home: Path | None = None) -> list[Path]:
    """Every folder looked at, existing or not, in order: MATHTUNE_LMSTUDIO_DIR, then the defaults."""
    environ = os.environ if environ is None else environ
    home = Path.home() if home is None else Path(home)  # Path.home() is %USERPROFILE% on Windows
    named = [Path(environ[ENV_DIR]).expanduser()] if environ.get(ENV_DIR) else []
    return [*named, *(home / d for d in HOME_DIRS)]


def model_dirs(environ: Mapping[str, str] | None = None, home: Path | None = None) -> list[Path]:
    """The LM Studio model folders that exist, in the order of `candidate_dirs` (each once)."""
    found: list[Path] = []
    for folder in candidate_dirs(environ, home):
        if folder.is_dir() and all(not _same(folder, f) for f in found):
            found.append(folder)
    return found


def _same(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def looked_at(environ: Mapping[str, str] | None = None, home: Path | None = None) -> str:
    """For error messages: the folders searched, and how to name another one."""
    paths = ", ".join(str(p) for p in candidate_dirs(environ, home))
    return f"looked at {paths}; set {ENV_DIR} to LM Studio's models folder if it is elsewhere"


def export_folder(run_name: str, environ: Mapping[str, str] | None = None, home: Path | None = None) -> Path:
    """Where `mathtune export RUN --to lmstudio` writes: <models folder>/mathtune/<run name>/."""
    dirs = model_dirs(environ, home)
    if not dirs:
        raise ModelError(f"no LM Studio models folder found ({looked_at(environ, home)}); start LM Studio once, or "
                         "use --to gguf and import the file yourself")
    return dirs[0] / "mathtune" / run_name


# ---------------------------------------------------------------------------------------------
# The models in them


@dataclass
class LocalModel:
    path: Path
    name: str
    """The path relative to its models folder, with '/': publisher/model/file.gguf."""
    architecture: str | None
    parameters: int | None
    quantization: str | None
    """The file type, e.g. Q4_K_M."""
    size_bytes: int
    trainable: bool
    why_not: str | None
    """Why mathtune cannot train it (None when it can)."""
    cached: Path | None
    """mathtune's converted copy of it, when there is one."""
    cached_bytes: int | None


def gguf_files(dirs: list[Path] | None = None) -> list[tuple[str, Path]]:
    """(name, path) of every model file: *.gguf except projectors and split parts after the first."""
    found = []
    for folder in model_dirs() if dirs is None else dirs:
        for path in sorted(Path(folder).rglob("*.gguf")):
            split = SPLIT_PART.search(path.name)
            if PROJECTOR.search(path.name) or (split and int(split.group(1)) != 1) or not path.is_file():
                continue
            found.append((path.relative_to(folder).as_posix(), path))
    return found


def list_models(dirs: list[Path] | None = None) -> list[LocalModel]:
    """Every model in LM Studio's folders (or `dirs`), described from its header; never raises for a
    bad file: an unreadable one is listed as not trainable, with the reason."""
    cache = cache_root(None)
    return [_describe(path, name, cache) for name, path in gguf_files(dirs)]


def _describe(path: Path, name: str, cache: Path) -> LocalModel:
    parts = _split_parts(path)
    size = sum(p.stat().st_size for p in parts)
    try:
        header = read_header(path)
    except (ValueError, OSError) as exc:
        return LocalModel(path, name, None, None, None, size, False, f"unreadable GGUF header: {exc}", None, None)
    arch = header.fields.get("general.architecture")
    why_not = _why_not_trainable(header, arch, parts)
    cached = None if why_not else _cached_copy(path, cache)
    return LocalModel(path, name, arch, header.parameters, header.quantization, size, why_not is None, why_not,
                      cached, _folder_bytes(cached) if cached else None)


def _why_not_trainable(header: GgufHeader, arch: str | None, parts: list[Path]) -> str | None:
    if header.missing_bytes:
        return (f"truncated: {header.missing_bytes:,} bytes of tensor data missing (an unfinished download?); "
                "download it again")
    if header.fields.get("general.type") == "adapter":
        return "a LoRA adapter, not a model"
    if SPLIT_PART.search(parts[0].name):
        return (f"split into {len(parts)} files, and transformers reads one-file GGUFs only: join them with "
                f"llama-gguf-split --merge {parts[0].name} OUT.gguf")
    if arch is None:
        return "no general.architecture in its header"
    if not gguf_architecture_supported(arch):
        return f"transformers cannot load GGUF architecture '{arch}'"
    return None


def _split_parts(path: Path) -> list[Path]:
    split = SPLIT_PART.search(path.name)
    if not split:
        return [path]
    stem, total = path.name[: split.start()], split.group(2)
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(stem)
                  and (m := SPLIT_PART.search(p.name)) and m.start() == len(stem) and m.group(2) == total)


def _cached_copy(path: Path, cache: Path) -> Path | None:
    if not cache.is_dir():  # nothing converted yet: no need to fingerprint every file
        return None
    try:
        folder = cache_folder(path, cache)
    except OSError:  # unreadable now: then it cannot be loaded either
        return None
    return folder if (folder / "config.json").is_file() else None


def find_model(fragment: str, dirs: list[Path] | None = None) -> Path:
    """The model whose name contains `fragment` (case-insensitive; several words must all appear, as in
    'mathstral q8'; '\\' counts as '/'). A name equal to the fragment wins over longer ones."""
    files = gguf_files(dirs)
    searched = ", ".join(str(d) for d in (model_dirs() if dirs is None else dirs))
    where = f"searched {searched}" if searched else looked_at()
    return _pick(fragment, {str(path): (name, path) for name, path in files}, lambda c: c[0],
                 f"GGUF model in LM Studio's folders ({where})", NoModelFound)[1]


class NoModelFound(ModelError):
    """No listed model's name contains the fragment (the message names the folders searched)."""


def _pick(fragment: str, items: Mapping[str, T], label: Callable[[T], str], what: str,
          missing: type[ModelError] = ModelError) -> T:
    """The one item whose label holds every word of `fragment`; errors list the candidates."""
    text = fragment.replace("\\", "/").lower()
    words = text.split()
    exact = [k for k, v in items.items() if label(v).lower() == text]
    matches = exact or [k for k, v in items.items() if words and all(w in label(v).lower() for w in words)]
    if not matches:
        raise missing(f"no {what} has '{fragment}' in its name")
    if len(matches) > 1:
        listed = "\n".join(f"  {k}" for k in matches)
        raise ModelError(f"'{fragment}' matches {len(matches)} of the {what}; name one more precisely:\n{listed}")
    return items[matches[0]]


def claims_hub_id(text: str, dirs: list[Path] | None = None) -> bool:
    """Whether an `org/name` string means an LM Studio model rather than the hub: some listed model
    has it in its name (e.g. 'lmstudio-community/Mathstral-7B-v0.1-GGUF', LM Studio's own label),
    and the local hub cache holds no model of that id."""
    if not any(text.lower() in name.lower() for name, _ in gguf_files(dirs)):
        return False
    from huggingface_hub import try_to_load_from_cache

    return not isinstance(try_to_load_from_cache(text, "config.json"), str)


# ---------------------------------------------------------------------------------------------
# mathtune models: the tables (the command prints them)


def models_table(dirs: list[Path], models: list[LocalModel]) -> list[str]:
    if not dirs:
        return [f"No LM Studio models folder found ({looked_at()})."]
    lines = [f"LM Studio models in {', '.join(str(d) for d in dirs)}:"]
    if not models:
        return [*lines, "  no .gguf files"]
    rows = [("name", "architecture", "parameters", "quantization", "size", "trainable", "cached")]
    rows += [(m.name, m.architecture or "?", _count(m.parameters), m.quantization or "?", size_text(m.size_bytes),
              "yes" if m.trainable else "no", size_text(m.cached_bytes) if m.cached else "-") for m in models]
    lines += table(rows)
    refused = [m for m in models if not m.trainable]
    if refused:
        lines += ["", "Not trainable:", *(f"  {m.name}: {m.why_not}" for m in refused)]
    lines += ["", "Train one with mathtune train --model NAME, NAME being a unique part of its name (e.g. the "
                  "model's name without publisher or quantization). Converted copies: mathtune models --cache"]
    return lines


def cache_table(entries: list[CachedModel]) -> list[str]:
    if not entries:
        return [f"No converted models in {cache_root(None)}."]
    rows = [("folder", "source file", "size", "in use")]
    rows += [(e.path.name, e.source or "?", size_text(e.size_bytes), "yes" if e.current else "no") for e in entries]
    total = sum(e.size_bytes for e in entries)
    return [f"Converted models in {cache_root(None)} ({size_text(total)}):", *table(rows),
            "", "'in use: no': the source file is gone or changed since, or a conversion was interrupted. "
                "Remove one with: mathtune models --remove NAME"]



def size_text(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _count(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n:,}"


# ---------------------------------------------------------------------------------------------
# mathtune's converted copies (mathtune models --cache, --remove)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@dataclass
class CachedModel:
    path: Path
    """The converted Transformers folder."""
    source: str | None
    """The GGUF file it was converted from, as recorded when it was."""
    size_bytes: int
    current: bool
    """Whether loading its source uses it now; False when the source is gone or changed since, or the
    copy was left by an interrupted conversion: then it only takes space."""


def cached_models(cache: Path | None = None) -> list[CachedModel]:
    """Every converted copy in mathtune's cache (MATHTUNE_CACHE or ~/.cache/mathtune unless `cache`)."""
    root = cache_root(cache)
    found = []
    for record in sorted(root.glob("**/mathtune_source.json")):
        folder = record.parent
        try:
            source = json.loads(record.read_text(encoding="utf-8")).get("gguf")
        except (OSError, ValueError, AttributeError):
            source = None
        current = bool(source) and Path(source).is_file() and cache_folder(Path(source), root) == folder
        found.append(CachedModel(folder, source, _folder_bytes(folder), current))
    return found


def remove_cached(fragment: str, cache: Path | None = None) -> CachedModel:
    """Delete the one converted copy whose folder or source file has `fragment` in its name."""
    entries = {str(e.path): e for e in cached_models(cache)}
    entry = _pick(fragment, entries, lambda e: f"{e.path.name} {e.source or ''}", "converted copies in the cache")
    shutil.rmtree(entry.path)
    return entry
