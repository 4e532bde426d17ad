"""The settings form of the New run page, built from the typed config (mathtune/config.py).

Each field of the config's sections becomes an input: its default from the field, its help text
from the docstring under the field (pydantic's `use_attribute_docstrings`), a choice list from its
Literal type. What the user submits goes through `load_config` as `--set KEY=VALUE` overrides do, so
the validation messages are the config's own, keyed by field. The memory estimate is `mathtune
doctor`'s (doctor.model_estimate) for the same config.
"""

from __future__ import annotations

import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from mathtune.config import Config, load_config, parse_override
from mathtune.doctor.diagnosis import diagnose
from mathtune.doctor.doctor import GIB, gather, model_estimate
from mathtune.errors import ConfigError, MathtuneError
from mathtune.hardware import PROBES
from mathtune.model.load import embedded_model_path

SECTIONS = ("lora", "train", "grpo", "dpo", "data", "eval", "model")
SKIPPED = {
    "model.path", "data.files",  # chosen in the model and data steps of the page
    "model.cache_dir", "data.eval_files", "data.fields",  # paths and mappings: for YAML files
    "model.trust_remote_code",  # runs code from the model: never one click away in a web form
}
"""Fields not shown; the output section is the run name."""
BASIC = {"train.method", "lora.r", "lora.alpha", "train.max_steps", "train.epochs", "train.batch_size", "train.learning_rate",
         "data.max_seq_length", "eval.max_examples", "model.device"}
"""Shown open; the others are under "more settings" of their section."""


@dataclass
class FormField:
    key: str
    kind: str
    """'bool', 'choice' or 'text'"""
    value: str | bool
    choices: tuple[str, ...] = ()
    help: str = ""
    basic: bool = False


def form_fields(values: dict[str, Any] | None = None) -> dict[str, list[FormField]]:
    """The form's fields per section, with `values` (dotted keys -> submitted text) over the defaults."""
    values = values or {}
    defaults = Config()
    out: dict[str, list[FormField]] = {}
    for section in SECTIONS:
        model = type(getattr(defaults, section))
        fields = []
        for name, info in model.model_fields.items():
            key = f"{section}.{name}"
            if key in SKIPPED:
                continue
            default = getattr(getattr(defaults, section), name)
            kind, choices = _kind(info.annotation)
            value = values.get(key, default if kind == "bool" else _text(default))
            if kind == "bool":
                value = value in (True, "true", "on")
            fields.append(FormField(key, kind, value, choices, " ".join((info.description or "").split()), key in BASIC))
        out[section] = fields
    return out


def _kind(annotation) -> tuple[str, tuple[str, ...]]:
    if annotation is bool:
        return "bool", ()
    if typing.get_origin(annotation) is Literal:
        return "choice", tuple(str(a) for a in typing.get_args(annotation))
    return "text", ()


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def submitted(form) -> dict[str, Any]:
    """The form's settings as text by dotted key. A checkbox is true when present (HTML sends nothing for
    an unchecked one); another field left out of the request keeps its default."""
    out: dict[str, Any] = {}
    for fields in form_fields().values():
        for f in fields:
            if f.kind == "bool":
                out[f.key] = "true" if form.get(f.key) else "false"
            elif f.key in form:
                out[f.key] = form[f.key]
    return out


def build_config(values: dict[str, Any], model_path: str | None, data_files: list[str], run_dir: Path) -> Config:
    """Validate the submitted settings as `mathtune train --set ...` would; ConfigError lists every problem."""
    overrides: dict[str, Any] = {"model.path": model_path, "data.files": data_files, "output.dir": str(run_dir)}
    text_fields = {f.key for fields in form_fields().values() for f in fields if f.kind == "text"}
    for key, raw in values.items():
        raw = str(raw).strip()
        if raw == "" and key in text_fields:
            overrides[key] = None  # empty: pydantic says whether the field may be empty
        elif _is_free_text(key):
            overrides[key] = raw  # a prompt or template stays as typed (YAML would read "a: b" as a mapping)
        else:
            overrides[key] = parse_override(f"{key}={raw}")[1]
    # The environment of the server is not the user's intent for this run: only the form counts.
    return load_config(overrides=overrides, environ={})


def _is_free_text(key: str) -> bool:
    section, name = key.split(".")
    annotation = type(getattr(Config(), section)).model_fields[name].annotation
    return annotation in (str, str | None)


def problems_by_field(error: ConfigError) -> tuple[dict[str, list[str]], list[str]]:
    """Problems keyed by the field they name ('train.batch_size: ...'); the others apart."""
    keys = {f.key for fields in form_fields().values() for f in fields}
    by_key: dict[str, list[str]] = {}
    other = []
    for problem in error.problems:
        key, _, message = problem.partition(": ")
        message = message.removesuffix(" (from command line)")
        if key in keys:
            by_key.setdefault(key, []).append(message)
        else:
            other.append(problem.removesuffix(" (from command line)"))
    return by_key, other


# ---------------------------------------------------------------------------------------------
# Memory estimate ("fits: 7.3 of 12 GiB")


_FACTS: dict[str, Any] = {}
FACTS_SECONDS = 30.0
"""The machine's facts (free memory, GPUs) are probed again after this long."""


def machine_facts() -> dict[str, Any]:
    if not _FACTS or time.monotonic() - _FACTS["at"] > FACTS_SECONDS:
        _FACTS.update(facts=gather(PROBES, Path(".")), at=time.monotonic())
    return _FACTS["facts"]


def memory_estimate(cfg: Config) -> dict[str, Any]:
    """doctor's estimate for the run: {'fits', 'total_gib', 'capacity_gib', 'where', 'fix'}."""

    facts = machine_facts()
    _, device, usable = diagnose(facts, cfg.model.device, need_4bit=cfg.model.load_in_4bit)
    model = cfg.model.path or str(embedded_model_path())
    try:
        _, estimate = model_estimate(cfg, model, facts, device)
    except MathtuneError as exc:
        return {"error": str(exc)}
    room = estimate["capacity"]
    return {"fits": estimate["fits"] and usable, "device": device, "where": estimate["where"],
            "total_gib": round(estimate["bytes"]["total"] / GIB, 1),
            "capacity_gib": None if room is None else round(room / GIB, 1),
            "fix": (estimate.get("fix") or {}).get("set")}
