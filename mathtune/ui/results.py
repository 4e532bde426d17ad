"""The pages of a finished run: Results (accuracy, samples, report, plots; evaluate again), Chat (base
and fine-tuned side by side) and Export."""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse

from mathtune.errors import MathtuneError
from mathtune.model.lmstudio import model_dirs
from mathtune.run import EVAL, PLOTS, REPORT
from mathtune.ui import runs as run_files
from mathtune.ui.page import finished, render, runs_dir, view
from mathtune.ui.work import EXPORTS, evaluate_and_report, export, exported_files, gguf_checks, llama_cpp_installed

router = APIRouter()

RUN_FILES = {"report": REPORT, "loss": f"{PLOTS}/loss.png", "accuracy": f"{PLOTS}/accuracy.png"}
"""The files of a run folder that the pages link to, by name: never a path from the request."""


@router.get("/runs/{name}/results", response_class=HTMLResponse)
def results_page(request: Request, name: str):
    current = view(request, name)
    return render(request, "results.html", run=current, samples=_samples(current.path),
                  job=request.app.state.jobs.get(name),
                  plots=[k for k in ("loss", "accuracy") if (current.path / RUN_FILES[k]).is_file()],
                  has_report=(current.path / RUN_FILES["report"]).is_file())


@router.post("/runs/{name}/evaluate")
def evaluate(request: Request, name: str):
    path = finished(view(request, name))
    request.app.state.jobs.start(name, "eval", lambda: evaluate_and_report(path))
    return RedirectResponse(f"/runs/{name}/results", status_code=303)


@router.get("/runs/{name}/files/{which}")
def run_file(request: Request, name: str, which: str):
    file = run_files.run_dir(runs_dir(request), name) / RUN_FILES.get(which, "\0")
    if which not in RUN_FILES or not file.is_file():
        return Response("no such file", status_code=404)
    return FileResponse(file)


@router.get("/runs/{name}/chat", response_class=HTMLResponse)
def chat_page(request: Request, name: str):
    return render(request, "chat.html", run=view(request, name))


@router.get("/runs/{name}/chat/stream")
def chat_stream(request: Request, name: str, q: str):
    path = finished(view(request, name))
    if not q.strip():
        raise MathtuneError("empty question")
    chat = request.app.state.chat

    def events():
        try:
            for side, text in chat.stream(path, q.strip()):
                yield f"data: {json.dumps({'side': side, 'text': text})}\n\n"
        except MathtuneError as exc:
            yield f"data: {json.dumps({'error': str(exc)})}\n\n"
        yield f"data: {json.dumps({'done': True})}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


@router.get("/runs/{name}/export", response_class=HTMLResponse)
def export_page(request: Request, name: str):
    current = view(request, name)
    choices = [c for c in EXPORTS if model_dirs() or EXPORTS[c][0] != "lmstudio"]
    return render(request, "export.html", run=current, choices=choices, files=exported_files(current.path),
                  job=request.app.state.jobs.get(name), checks=gguf_checks(current.path),
                  can_check=llama_cpp_installed())


@router.post("/runs/{name}/export")
async def start_export(request: Request, name: str):
    path = finished(view(request, name))
    form = await request.form()
    choice, check = str(form.get("what", "")), form.get("check") == "on"
    if choice not in EXPORTS:
        raise MathtuneError(f"{choice!r}: expected one of {', '.join(EXPORTS)}")
    request.app.state.jobs.start(name, "export", lambda: export(path, choice, check))
    return RedirectResponse(f"/runs/{name}/export", status_code=303)


def _samples(path: Path, limit: int = 6) -> list[dict]:
    file = path / EVAL / "predictions.jsonl"
    if not file.is_file():
        return []
    out = []
    for line in file.read_text(encoding="utf-8").splitlines()[:limit]:
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out
