"""`mathtune ui`: the whole job in a local web page, over the files the CLI writes.

    mathtune ui                          # http://127.0.0.1:8765/?token=... opens in the browser
    mathtune ui --runs runs --port 9000 --no-browser

Pages: Runs, New run (model, data check and stats, settings from the typed config with the memory
estimate), Run (live loss, progress, log; Stop and Resume), Results, Chat (base and fine-tuned side
by side), Export. The stack is FastAPI + Jinja2 templates + server-sent events, plain HTML forms, a
little vanilla JavaScript and SVG charts, all shipped in the package (no CDN): about 5 MB of
packages on top of mathtune's own, answering 3 s after `mathtune ui` on a busy 2-core machine (most of
it importing FastAPI), offline, and tested with FastAPI's test client and a real headless Chromium.
One router a page group: new_run.py (Runs, New run), live.py (Run), results.py (Results, Chat,
Export); page.py renders their templates. The security rules are in security.py.
"""

from __future__ import annotations

import secrets
import socket
import sys
import threading
import webbrowser
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from mathtune.errors import MathtuneError
from mathtune.ui import live, new_run, results, security
from mathtune.ui import runs as run_files
from mathtune.ui.i18n import LANGUAGES
from mathtune.ui.page import render
from mathtune.ui.work import ChatModels, Jobs

HERE = Path(__file__).parent


def create_app(runs: Path, token: str, port: int = 8765, host: str = "127.0.0.1",
               upload_limit: int = security.MAX_UPLOAD_BYTES) -> FastAPI:
    app = FastAPI(title="mathtune", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runs, app.state.csrf, app.state.upload_limit = Path(runs).resolve(), secrets.token_urlsafe(24), upload_limit
    app.state.trainer, app.state.jobs, app.state.chat = run_files.RunLauncher(), Jobs(), ChatModels()
    app.state.templates = Jinja2Templates(directory=HERE / "templates")
    app.add_middleware(security.Guard, token=token, csrf=app.state.csrf, port=port, bind_host=host)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_exception_handler(MathtuneError, user_error)
    app.add_api_route("/lang", set_language, methods=["GET"])
    for router in (new_run.router, live.router, results.router):
        app.include_router(router)
    return app


async def user_error(request: Request, exc: MathtuneError):
    """A MathtuneError as a page (or JSON for the page's scripts): 413 for an upload over the limit,
    404 for a run that is not there, 400 for the rest."""
    code = 413 if isinstance(exc, security.TooLarge) else 404 if isinstance(exc, run_files.NoSuchRun) else 400
    if request.headers.get("x-csrf-token") or request.url.path.startswith("/api/"):
        return JSONResponse({"error": str(exc)}, status_code=code)
    return render(request, "error.html", status_code=code, message=str(exc))


def set_language(to: str, next: str = "/"):
    target = next if next.startswith("/") and not next.startswith("//") else "/"
    response = RedirectResponse(target, status_code=303)
    if to in LANGUAGES:
        response.set_cookie("lang", to, samesite="strict", max_age=365 * 86400)
    return response


# ---------------------------------------------------------------------------------------------
# The command


def serve(runs: Path, host: str = "127.0.0.1", port: int = 8765, open_browser: bool = True) -> None:
    """`mathtune ui`: bind, print the address with its token, open the browser, serve until Ctrl-C."""
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
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    server.run(sockets=[sock])
