"""`mathtune ui` in a real headless Chromium: the whole job, as a user clicks through it.

Debian's `chromium` driven by Playwright for Python (`executable_path`; Playwright's own browser
download needs the network). .ci/run installs chromium when it is missing. Screenshots of every
page are kept in the test's tmp folder (shots/), to be looked at.

The run has 200 tiny steps rather than 3: Stop must land while it trains. The training processes
get one thread each (OMP_NUM_THREADS=1): on a shared 2-core machine a tiny model's steps went from
1.5 s to 0.13 s that way, and threads bring a model this small nothing.
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from tests.conftest import math_records, write_jsonl

TOKEN = "browser-test-token"


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    import os
    import socket

    import uvicorn

    from mathtune.ui.server import create_app

    runs = tmp_path_factory.mktemp("ui-runs")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the training processes
    app = create_app(runs, TOKEN, port=port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield app, f"http://127.0.0.1:{port}"
    for proc in app.state.trainer.procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    server.should_exit = True
    thread.join(10)
    if threads is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = threads


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    assert chromium, "the browser tests need Debian's chromium: apt-get install chromium (.ci/run does it)"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield b
        b.close()


def test_the_whole_job_in_the_browser(ui_server, browser, tiny_llama_dir, tmp_path, monkeypatch):
    from playwright.sync_api import expect

    lmstudio = tmp_path / "lmstudio-models"
    lmstudio.mkdir()
    monkeypatch.setenv("MATHTUNE_LMSTUDIO_DIR", str(lmstudio))  # read by the server, in this process
    app, base = ui_server
    shots = tmp_path / "shots"
    shots.mkdir()
    page = browser.new_page(viewport={"width": 1200, "height": 900}, locale="en-US")

    phases = []

    def shot(name: str) -> None:
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
        phases.append(f"{name} {time.perf_counter() - started:.0f} s")

    started = time.perf_counter()
    page.goto(f"{base}/?token={TOKEN}")
    assert "token" not in page.url  # the token moved to a cookie
    expect(page.locator("h1")).to_have_text("Runs")
    shot("01-runs-empty")

    # Model: a typed path
    page.click("text=New run")
    page.fill("#model-path", str(tiny_llama_dir))
    page.click("#model button[type=submit] >> nth=-1")
    expect(page.locator("#model-path")).to_have_value(str(tiny_llama_dir))

    # Data: one bad record (line 3) -> its error; fixed file -> valid, with statistics
    records = math_records(24)
    bad = write_jsonl(tmp_path / "bad.jsonl", records[:2] + [{"instruction": "What is 3 + 6?"}] + records[3:])
    page.set_input_files("#upload-file", str(bad))
    page.click("#upload button")
    expect(page.locator("#problems")).to_contain_text(":3: output: missing")
    shot("02-data-bad-record")
    page.click("ul.files >> text=Remove")
    page.set_input_files("#upload-file", str(write_jsonl(tmp_path / "good.jsonl", records)))
    page.click("#upload button")
    expect(page.locator("#check")).to_contain_text("Every record is valid (24 records)")
    expect(page.locator("#stats")).to_contain_text("arithmetic")

    # Settings: a validation message from the config's validator, the memory estimate
    for summary in page.locator("#settings-form summary").all():
        summary.click()
    page.fill('[name="train.batch_size"]', "0")
    expect(page.locator('[data-key="train.batch_size"] .problem')).to_contain_text("greater than 0")
    settings = {"lora.r": "4", "lora.alpha": "8", "train.max_steps": "200", "train.batch_size": "4",
                "train.learning_rate": "0.01", "train.logging_steps": "1", "train.save_steps": "1000",
                "data.eval_fraction": "0.25", "eval.max_examples": "3", "eval.max_new_tokens": "6"}
    for key, value in settings.items():
        page.fill(f'[name="{key}"]', value)
    page.fill("#run-name", "first")
    expect(page.locator('[data-key="train.batch_size"] .problem')).to_be_empty()
    expect(page.locator("#estimate")).to_contain_text("fits:")
    shot("03-new-run")

    # Start -> live loss chart; Stop -> checkpoint; Resume -> finished
    page.click("#start")
    expect(page).to_have_url(f"{base}/runs/first")
    expect(page.locator("#chart")).to_have_attribute("data-points", _at_least(3), timeout=240_000)
    page.click("#stop")
    expect(page.locator("#status")).to_have_class("status interrupted", timeout=120_000)
    stopped_at = int(page.locator("#chart").get_attribute("data-points"))
    expect(page.locator("#log")).to_contain_text("mathtune train --resume")
    shot("04-run-interrupted")
    page.click("#resume")
    expect(page.locator("#status")).to_have_class("status finished", timeout=300_000)
    assert int(page.locator("#chart").get_attribute("data-points")) > stopped_at
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#resume")).to_be_hidden()
    shot("05-run-finished")

    # Results: the accuracy table written by the evaluation at the end of training
    page.click("header >> text=Results")
    expect(page.locator("#accuracy")).to_contain_text("arithmetic")
    expect(page.locator(".sample").first).to_be_visible()
    shot("06-results")

    # Chat: both models answer, streamed
    page.click("header >> text=Chat")
    page.fill("#question", "What is 2 + 3?")
    page.click("#ask")
    expect(page.locator("#chat-form")).to_have_attribute("data-done", "1", timeout=60_000)
    assert page.locator("#answer-tuned").inner_text().strip() and page.locator("#answer-base").inner_text().strip()
    shot("07-chat")

    # Export a GGUF, then the same straight into (a stand-in for) LM Studio's models folder
    page.click("header >> text=Export")
    page.click("#export")
    expect(page.locator("#exported")).to_contain_text(".gguf", timeout=90_000)
    shot("08-export")
    page.check('input[value="lmstudio-f16"]')
    page.click("#export")
    expect(page.locator("#job")).to_contain_text(str(lmstudio / "mathtune" / "first"), timeout=90_000)
    assert [p.name for p in (lmstudio / "mathtune" / "first").iterdir()] == [f"{tiny_llama_dir.name}-f16.gguf"]
    shot("09-export-lmstudio")

    # Runs list and Spanish
    page.goto(f"{base}/")
    expect(page.locator("#runs")).to_contain_text("finished")
    page.click("#lang")
    expect(page.locator("h1")).to_have_text("Entrenamientos")
    expect(page.locator("#runs")).to_contain_text("terminado")
    shot("10-runs-es")
    print(f"\nbrowser flow: {time.perf_counter() - started:.1f} s ({', '.join(phases)}); screenshots in {shots}")


def _at_least(n: int):
    import re

    return re.compile(rf"^([{n}-9]|\d\d+)$")
