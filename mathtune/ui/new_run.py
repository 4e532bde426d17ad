"""The Runs page and the New run page: the model, the data (uploaded or typed, checked and
described as `mathtune data check` and `data stats` do), the settings form with its memory estimate,
and the start of a training process."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from mathtune.config import ModelConfig, dump_config
from mathtune.data.check import check_files
from mathtune.data.dataset import MAX_CHARS_PER_TOKEN
from mathtune.data.stats import dataset_stats
from mathtune.data.tokenize import ensure_chat_template
from mathtune.errors import ConfigError, DataError, MathtuneError
from mathtune.model.lmstudio import list_models
from mathtune.model.load import load_tokenizer
from mathtune.ui import form as settings
from mathtune.ui import runs as run_files
from mathtune.ui import security
from mathtune.ui.page import render, runs_dir

router = APIRouter()


@router.get("/", response_class=HTMLResponse)
def runs_page(request: Request):
    return render(request, "runs.html", runs=run_files.list_runs(runs_dir(request), request.app.state.trainer))


@router.get("/new", response_class=HTMLResponse)
def new_page(request: Request):
    typed = request.query_params.get("data_path", "").strip()
    data = request.query_params.getlist("data") + ([f"path:{typed}"] if typed else [])
    choice = _choice(request.query_params.get("model", ""), data)
    return new_run_page(request, choice, settings.form_fields(), {}, [])


def new_run_page(request: Request, choice: dict, fields, field_problems, other_problems, status_code: int = 200):
    runs = runs_dir(request)
    data = [_data_file(runs, ref) for ref in choice["data"]]
    check = _check([p for _, p, _ in data], {str(p): label for _, p, label in data}) if data else None
    stats = _stats([p for _, p, _ in data], choice["model"]) if data and check and check["ok"] else None
    return render(request, "new.html", status_code=status_code, choice=choice, data=data, check=check, stats=stats,
                  sections=fields, field_problems=field_problems, other_problems=other_problems,
                  models=list_models(), default_name=_default_name(runs))


@router.post("/data/upload")
async def upload(request: Request):
    limit = request.app.state.upload_limit
    declared = int(request.headers.get("content-length") or 0)
    if declared > limit + (64 << 10):  # the file plus the form's other fields
        raise security.TooLarge(f"upload of {declared:,} bytes is over the limit of {limit:,} bytes")
    form = await request.form()
    file = form.get("file")
    if file is None or isinstance(file, str):
        raise MathtuneError("no file chosen")
    saved = await security.save_upload(file, runs_dir(request) / run_files.UI_DIR / "uploads", limit)
    label = Path(file.filename or "").name[:80]  # shown on the page only; the file is saved.name
    choice = _choice(str(form.get("model", "")), [*form.getlist("data"), f"upload:{saved.name}/{label}"])
    return RedirectResponse(_new_url(choice), status_code=303)


@router.post("/runs")
async def start_run(request: Request):
    runs = runs_dir(request)
    form = await request.form()
    choice = _choice(str(form.get("model", "")), form.getlist("data"))
    data = [p for _, p, _ in (_data_file(runs, ref) for ref in choice["data"])]
    values = settings.submitted(form)
    name = str(form.get("name", "")).strip()
    try:
        if not run_files.run_name_ok(name) or run_files.name_taken(runs, name):
            raise ConfigError([f"run name {name!r}: letters, digits, '.', '_' and '-', not an existing run"])
        if data and not _check(data)["ok"]:
            raise ConfigError(["data: the files have invalid records (see above)"])
        cfg = settings.build_config(values, choice["model"] or None, [str(p) for p in data], runs / name)
    except ConfigError as exc:
        by_field, other = settings.problems_by_field(exc)
        return new_run_page(request, choice, settings.form_fields(values), by_field, other, status_code=422)
    request.app.state.trainer.start(runs, name, dump_config(cfg))
    return RedirectResponse(f"/runs/{name}", status_code=303)


@router.post("/api/estimate")
async def estimate(request: Request):
    form = await request.form()
    choice = _choice(str(form.get("model", "")), [])
    try:
        cfg = settings.build_config(settings.submitted(form), choice["model"] or None, [],
                                    runs_dir(request) / "estimate")
    except ConfigError as exc:
        by_field, other = settings.problems_by_field(exc)
        return {"problems": by_field, "other": other}
    return {"problems": {}, "other": [], "estimate": await asyncio.to_thread(settings.memory_estimate, cfg)}


def _choice(model: str, data: list[str]) -> dict:
    """The model and data chosen so far (carried in the New run page's address and forms), checked."""
    model = str(security.typed_model_path(model)) if model.strip() else ""
    return {"model": model, "data": list(dict.fromkeys(d for d in data if d))}


def _new_url(choice: dict) -> str:
    return "/new?" + urlencode([("model", choice["model"]), *(("data", d) for d in choice["data"])])


def _data_file(runs: Path, ref: str) -> tuple[str, Path, str]:
    """('upload:<generated name>/<client's name>' | 'path:<typed path>') -> (ref, checked file, label).
    The client's name of an upload is a label on the page, never part of a path."""
    kind, _, value = ref.partition(":")
    if kind == "upload":
        name, _, label = value.partition("/")
        return ref, security.uploaded_file(runs / run_files.UI_DIR / "uploads", name), label or name
    if kind == "path":
        path = security.typed_data_file(value)
        return f"path:{path}", path, str(path)
    raise MathtuneError(f"{ref!r}: expected upload:NAME or path:FILE")


def _check(paths: list[Path], labels: dict[str, str] | None = None) -> dict:
    """`mathtune data check` on the files: every problem with its place (file:line), the file by its label."""
    def named(place: str) -> str:
        return next((labels[p] + place[len(p):] for p in labels or {} if place.startswith(p)), place)

    problems: list[tuple[str, str]] = []
    report = check_files(paths, lambda place, message: problems.append((named(place), message)),
                         max_chars=MAX_CHARS_PER_TOKEN * 512)
    return {"ok": report.ok, "problems": problems, "files": report.files}


_TOKENIZERS: dict[str, object] = {}


def _stats(paths: list[Path], model: str) -> dict:
    """`mathtune data stats`, with token lengths from the chosen model's tokenizer."""
    if model not in _TOKENIZERS:
        try:
            tokenizer = load_tokenizer(ModelConfig(path=model or None))
            ensure_chat_template(tokenizer, "plain")
        except MathtuneError:
            tokenizer = None  # statistics without token counts
        _TOKENIZERS[model] = tokenizer
    try:
        return dataset_stats(paths, _TOKENIZERS[model]).to_dict()
    except DataError as exc:
        return {"error": str(exc)}


def _default_name(runs: Path) -> str:
    """runs/<date>-<time> as `mathtune train` names a run, with a suffix if that folder exists."""
    stem = datetime.now().strftime("%Y%m%d-%H%M%S")
    return next(name for name in (stem, *(f"{stem}-{i}" for i in range(2, 100))) if not run_files.name_taken(runs, name))
