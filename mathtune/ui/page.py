"""What every page of `mathtune ui` shares: rendering a template in the visitor's language, and the
run a page is about.

    return render(request, "run.html", run=view(request, name))

The app's state (mathtune/ui/server.py, create_app) holds what the routers read: the runs folder,
the CSRF token, the templates, the process launcher, the eval/export jobs and the chat models.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import Request
from fastapi.responses import HTMLResponse

from mathtune.errors import MathtuneError
from mathtune.run import ADAPTER
from mathtune.ui import runs as run_files
from mathtune.ui.i18n import LANGUAGES, pick_language, translator


def render(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
    """The template `name` in the language of the visitor's cookie (else their browser's)."""
    state = request.app.state
    lang = pick_language(request.cookies.get("lang"), request.headers.get("accept-language"))
    context.update(request=request, t=translator(lang), lang=lang, other_lang=LANGUAGES[1 - LANGUAGES.index(lang)],
                   csrf=state.csrf, runs_dir=state.runs)
    return state.templates.TemplateResponse(request, name, context, status_code=status_code)


def runs_dir(request: Request) -> Path:
    return request.app.state.runs


def view(request: Request, name: str) -> run_files.RunView:
    """The run `name` of the runs folder, as its pages show it (NoSuchRun for any other name)."""
    return run_files.read_run(runs_dir(request), name, request.app.state.trainer)


def finished(current: run_files.RunView) -> Path:
    """The folder of a run that has an adapter and is not training: what results, chat and export need."""
    if not (current.path / ADAPTER).is_dir() or current.status == "running":
        raise MathtuneError(f"{current.name}: not finished; results, chat and export need its adapter")
    return current.path
