"""`mathtune ui`: the whole job in a local web page, over the files the CLI writes.

    mathtune ui                          # http://127.0.0.1:8765/?token=... opens in the browser
    mathtune ui --runs runs --port 9000 --no-browser

Pages: Runs, New run (model, data check and stats, settings from the typed config with the memory
estimate), Run (live loss, progress, log; Stop and Resume), Results, Chat (base and fine-tuned side
by side), Export. The stack is FastAPI + Jinja2 templates + server-sent events, plain HTML forms, a
little vanilla JavaScript and SVG charts, all shipped in the package (no CDN): about 5 MB of
packages on top of mathtune's own, answering 3 s after `mathtune ui` on a busy 2-core machine (most of
it importing FastAPI), offline, and tested with FastAPI's test client and a real headless Chromium.
The security rules are in security.py.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from mathtune.config import dump_config
from mathtune.errors import ConfigError, DataError, MathtuneError
from mathtune.ui import form as settings
from mathtune.ui import runs as run_files
from mathtune.ui import security
from mathtune.ui.i18n import LANGUAGES, pick_language, translator
from mathtune.ui.work import EXPORTS, ChatModels, Jobs, evaluate_and_report, export, exported_files

HERE = Path(__file__).parent
EVENT_SECONDS = 1.0
"""How often a Run page's event stream looks at the run folder."""
RUN_FILES = {"report": "report.html", "loss": "plots/loss.png", "accuracy": "plots/accuracy.png"}
"""The files of a run folder that the pages link to, by name: never a path from the request."""


def create_app(runs: Path, token: str, port: int = 8765, host: str = "127.0.0.1",
               upload_limit: int = security.MAX_UPLOAD_BYTES) -> FastAPI:
    runs = Path(runs).resolve()
    app = FastAPI(title="mathtune", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runs, app.state.csrf, app.state.upload_limit = runs, secrets.token_urlsafe(24), upload_limit
    app.state.trainer, app.state.jobs, app.state.chat = run_files.RunLauncher(), Jobs(), ChatModels()
    app.add_middleware(security.Guard, token=token, csrf=app.state.csrf, port=port, bind_host=host)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")

    def page(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
        lang = pick_language(request.cookies.get("lang"), request.headers.get("accept-language"))
        context.update(request=request, t=translator(lang), lang=lang, other_lang=LANGUAGES[1 - LANGUAGES.index(lang)],
                       csrf=app.state.csrf, runs_dir=runs)
        return templates.TemplateResponse(request, name, context, status_code=status_code)

    def view(name: str) -> run_files.RunView:
        return run_files.read_run(runs, name, app.state.trainer)

    @app.exception_handler(MathtuneError)
    async def user_error(request: Request, exc: MathtuneError):
        code = 413 if isinstance(exc, security.TooLarge) else 404 if isinstance(exc, run_files.NoSuchRun) else 400
        if request.headers.get("x-csrf-token") or request.url.path.startswith("/api/"):
            return JSONResponse({"error": str(exc)}, status_code=code)
        return page(request, "error.html", status_code=code, message=str(exc))

    @app.get("/lang")
    def set_language(to: str, next: str = "/"):
        target = next if next.startswith("/") and not next.startswith("//") else "/"
        response = RedirectResponse(target, status_code=303)
        if to in LANGUAGES:
            response.set_cookie("lang", to, samesite="strict", max_age=365 * 86400)
        return response

    # -- Runs and New run -------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    def runs_page(request: Request):
        return page(request, "runs.html", runs=run_files.list_runs(runs, app.state.trainer))

    @app.get("/new", response_class=HTMLResponse)
    def new_page(request: Request):
        typed = request.query_params.get("data_path", "").strip()
        data = request.query_params.getlist("data") + ([f"path:{typed}"] if typed else [])
        choice = _choice(request.query_params.get("model", ""), data)
        return new_run_page(request, choice, settings.form_fields(), {}, [])

    def new_run_page(request: Request, choice: dict, fields, field_problems, other_problems, status_code: int = 200):
        data = [_data_file(runs, ref) for ref in choice["data"]]
        check = _check([p for _, p, _ in data], {str(p): label for _, p, label in data}) if data else None
        stats = _stats([p for _, p, _ in data], choice["model"]) if data and check and check["ok"] else None
        return page(request, "new.html", status_code=status_code, choice=choice, data=data, check=check, stats=stats,
                    sections=fields, field_problems=field_problems, other_problems=other_problems,
                    models=_lmstudio_models(), default_name=_default_name(runs))

    @app.post("/data/upload")
    async def upload(request: Request):
        declared = int(request.headers.get("content-length") or 0)
        if declared > app.state.upload_limit + (64 << 10):  # the file plus the form's other fields
            raise security.TooLarge(f"upload of {declared:,} bytes is over the limit of {app.state.upload_limit:,} bytes")
        form = await request.form()
        file = form.get("file")
        if file is None or isinstance(file, str):
            raise MathtuneError("no file chosen")
        saved = await security.save_upload(file, runs / run_files.UI_DIR / "uploads", app.state.upload_limit)
        label = Path(file.filename or "").name[:80]  # shown on the page only; the file is saved.name
        choice = _choice(str(form.get("model", "")), [*form.getlist("data"), f"upload:{saved.name}/{label}"])
        return RedirectResponse(_new_url(choice), status_code=303)

    @app.post("/runs")
    async def start_run(request: Request):
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
        app.state.trainer.start(runs, name, dump_config(cfg))
        return RedirectResponse(f"/runs/{name}", status_code=303)

    @app.post("/api/estimate")
    async def estimate(request: Request):
        form = await request.form()
        choice = _choice(str(form.get("model", "")), [])
        try:
            cfg = settings.build_config(settings.submitted(form), choice["model"] or None, [], runs / "estimate")
        except ConfigError as exc:
            by_field, other = settings.problems_by_field(exc)
            return {"problems": by_field, "other": other}
        return {"problems": {}, "other": [], "estimate": await asyncio.to_thread(settings.memory_estimate, cfg)}

    # -- Run: live view, stop, resume ---------------------------------------------------------

    @app.get("/runs/{name}", response_class=HTMLResponse)
    def run_page(request: Request, name: str):
        return page(request, "run.html", run=view(name))

    @app.get("/runs/{name}/events")
    async def run_events(request: Request, name: str):
        run_files.run_dir(runs, name)

        async def stream():
            sent = 0
            while not await request.is_disconnected():
                current = view(name)
                metrics = run_files.read_metrics(current.path)
                job = app.state.jobs.get(name)
                reset = len(metrics) < sent  # a resumed run drops the lines past its checkpoint
                sent = 0 if reset else sent
                event = {"status": current.status, "reset": reset, "metrics": metrics[sent:],
                         "progress": run_files.progress(current, metrics),
                         "log": run_files.log_tail(runs, name), "job": job.as_dict() if job else None,
                         "exports": [p.name for p in exported_files(current.path)]}
                sent = len(metrics)
                yield f"data: {json.dumps(event)}\n\n"
                await asyncio.sleep(EVENT_SECONDS)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.post("/runs/{name}/stop")
    def stop(name: str):
        run_files.run_dir(runs, name)
        app.state.trainer.stop(name)
        return RedirectResponse(f"/runs/{name}", status_code=303)

    @app.post("/runs/{name}/resume")
    def resume(name: str):
        app.state.trainer.resume(runs, name)
        return RedirectResponse(f"/runs/{name}", status_code=303)

    # -- Results, chat, export -----------------------------------------------------------------

    @app.get("/runs/{name}/results", response_class=HTMLResponse)
    def results_page(request: Request, name: str):
        current = view(name)
        return page(request, "results.html", run=current, samples=_samples(current.path), job=app.state.jobs.get(name),
                    plots=[k for k in ("loss", "accuracy") if (current.path / RUN_FILES[k]).is_file()],
                    has_report=(current.path / RUN_FILES["report"]).is_file())

    @app.post("/runs/{name}/evaluate")
    def evaluate(name: str):
        path = _finished(view(name))
        app.state.jobs.start(name, "eval", lambda: evaluate_and_report(path))
        return RedirectResponse(f"/runs/{name}/results", status_code=303)

    @app.get("/runs/{name}/files/{which}")
    def run_file(name: str, which: str):
        file = run_files.run_dir(runs, name) / RUN_FILES.get(which, "\0")
        if which not in RUN_FILES or not file.is_file():
            return Response("no such file", status_code=404)
        return FileResponse(file)

    @app.get("/runs/{name}/chat", response_class=HTMLResponse)
    def chat_page(request: Request, name: str):
        return page(request, "chat.html", run=view(name))

    @app.get("/runs/{name}/chat/stream")
    def chat_stream(name: str, q: str):
        path = _finished(view(name))
        if not q.strip():
            raise MathtuneError("empty question")

        def events():
            try:
                for side, text in app.state.chat.stream(path, q.strip()):
                    yield f"data: {json.dumps({'side': side, 'text': text})}\n\n"
            except MathtuneError as exc:
                yield f"data: {json.dumps({'error': str(exc)})}\n\n"
            yield f"data: {json.dumps({'done': True})}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.get("/runs/{name}/export", response_class=HTMLResponse)
    def export_page(request: Request, name: str):
        current = view(name)
        from mathtune.model.lmstudio import model_dirs

        choices = [c for c in EXPORTS if model_dirs() or EXPORTS[c][0] != "lmstudio"]
        return page(request, "export.html", run=current, choices=choices, files=exported_files(current.path),
                    job=app.state.jobs.get(name))

    @app.post("/runs/{name}/export")
    async def start_export(request: Request, name: str):
        path = _finished(view(name))
        choice = str((await request.form()).get("what", ""))
        if choice not in EXPORTS:
            raise MathtuneError(f"{choice!r}: expected one of {', '.join(EXPORTS)}")
        app.state.jobs.start(name, "export", lambda: export(path, choice))
        return RedirectResponse(f"/runs/{name}/export", status_code=303)

    return app


# ---------------------------------------------------------------------------------------------
# Helpers of the pages


def _choice(model: str, data: list[str]) -> dict:
    """The model and data chosen so far (carried in the New run page's address and forms), checked."""
    model = str(security.typed_model_path(model)) if model.strip() else ""
    return {"model": model, "data": list(dict.fromkeys(d for d in data if d))}


def _new_url(choice: dict) -> str:
    from urllib.parse import urlencode

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
    from mathtune.data.check import check_files
    from mathtune.data.dataset import MAX_CHARS_PER_TOKEN

    def named(place: str) -> str:
        return next((labels[p] + place[len(p):] for p in labels or {} if place.startswith(p)), place)

    problems: list[tuple[str, str]] = []
    report = check_files(paths, lambda place, message: problems.append((named(place), message)),
                         max_chars=MAX_CHARS_PER_TOKEN * 512)
    return {"ok": report.ok, "problems": problems, "files": report.files}


_TOKENIZERS: dict[str, object] = {}


def _stats(paths: list[Path], model: str) -> dict:
    """`mathtune data stats`, with token lengths from the chosen model's tokenizer."""
    from mathtune.config import ModelConfig
    from mathtune.data.dataset import ensure_chat_template
    from mathtune.data.stats import dataset_stats
    from mathtune.model.load import load_tokenizer

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


def _samples(path: Path, limit: int = 6) -> list[dict]:
    file = path / "eval" / "predictions.jsonl"
    if not file.is_file():
        return []
    out = []
    for line in file.read_text(encoding="utf-8").splitlines()[:limit]:
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


def _finished(current: run_files.RunView) -> Path:
    if not (current.path / "adapter").is_dir() or current.status == "running":
        raise MathtuneError(f"{current.name}: not finished; results, chat and export need its adapter")
    return current.path


def _default_name(runs: Path) -> str:
    """runs/<date>-<time> as `mathtune train` names a run, with a suffix if that folder exists."""
    from datetime import datetime

    stem = datetime.now().strftime("%Y%m%d-%H%M%S")
    return next(name for name in (stem, *(f"{stem}-{i}" for i in range(2, 100))) if not run_files.name_taken(runs, name))


def _lmstudio_models() -> list:
    """The GGUF files in LM Studio's models folders, as `mathtune models` lists them."""
    from mathtune.model.lmstudio import list_models

    return list_models()


# ---------------------------------------------------------------------------------------------
# The command


def serve(runs: Path, host: str = "127.0.0.1", port: int = 8765, open_browser: bool = True) -> None:
    """`mathtune ui`: bind, print the address with its token, open the browser, serve until Ctrl-C."""
    import socket
    import sys
    import webbrowser

    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"mathtune ui: WARNING: listening on {host}: other machines on the network can reach this page; "
              "anyone with the token in the address can start runs and write files here.", file=sys.stderr)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise MathtuneError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another with --port") from None
    port = sock.getsockname()[1]
    token = security.new_token()
    app = create_app(runs, token, port=port, host=host)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}/?token={token}"
    print(f"mathtune ui: runs in {Path(runs).resolve()}\n  open {url}\n  (Ctrl-C stops the server; "
          "runs in progress go on)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    if open_browser:
        import threading

        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    server.run(sockets=[sock])
