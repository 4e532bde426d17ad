"""The Run page: a run's live loss, progress and log over server-sent events; Stop and Resume."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse

from mathtune.ui import runs as run_files
from mathtune.ui.page import render, runs_dir, view
from mathtune.ui.work import exported_files

router = APIRouter()

EVENT_SECONDS = 1.0
"""How often a Run page's event stream looks at the run folder."""


@router.get("/runs/{name}", response_class=HTMLResponse)
def run_page(request: Request, name: str):
    return render(request, "run.html", run=view(request, name))


@router.get("/runs/{name}/events")
async def run_events(request: Request, name: str):
    runs = runs_dir(request)
    run_files.run_dir(runs, name)

    async def stream():
        sent = 0
        while not await request.is_disconnected():
            current = view(request, name)
            metrics = run_files.read_metrics(current.path)
            job = request.app.state.jobs.get(name)
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


@router.post("/runs/{name}/stop")
def stop(request: Request, name: str):
    run_files.run_dir(runs_dir(request), name)
    request.app.state.trainer.stop(name)
    return RedirectResponse(f"/runs/{name}", status_code=303)


@router.post("/runs/{name}/resume")
def resume(request: Request, name: str):
    request.app.state.trainer.resume(runs_dir(request), name)
    return RedirectResponse(f"/runs/{name}", status_code=303)
