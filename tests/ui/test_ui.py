"""`mathtune ui` through FastAPI's test client: every endpoint, and each security rule refused."""

from __future__ import annotations

import json
import re
import signal
import sys

import pytest

from tests.conftest import math_records, write_jsonl

TOKEN = "test-token"
ORIGIN = "http://127.0.0.1:8765"


@pytest.fixture
def runs(tmp_path):
    return tmp_path / "runs"


@pytest.fixture
def app(runs, tmp_path):
    from mathtune.ui.server import create_app

    return create_app(runs, TOKEN, port=8765, upload_limit=4096)


@pytest.fixture
def anonymous(app):
    from fastapi.testclient import TestClient

    return TestClient(app, base_url=ORIGIN, follow_redirects=False)


@pytest.fixture
def client(anonymous):
    assert anonymous.get(f"/?token={TOKEN}").status_code == 303  # sets the cookie
    return anonymous


def csrf(app) -> dict:
    return {"X-CSRF-Token": app.state.csrf}


class FakeProcess:
    """Stands in for the `mathtune train` process: records how it was started and signalled."""

    started: list[list[str]] = []

    def __init__(self, args, **kwargs):
        FakeProcess.started.append(args)
        self.kwargs, self.signals, self.returncode, self.pid = kwargs, [], None, 4242

    def poll(self):
        return self.returncode

    def wait(self):
        import time

        while self.returncode is None:
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, sig):
        self.signals.append(sig)
        self.returncode = 130


@pytest.fixture
def fake_popen(monkeypatch):
    import mathtune.ui.runs as runs_module

    FakeProcess.started = []
    monkeypatch.setattr(runs_module.subprocess, "Popen", FakeProcess)
    return FakeProcess


# -- Access token, Host header, CSRF ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/new", "/runs/x/events", "/static/app.js", "/lang?to=es"])
def test_every_request_without_the_token_is_refused(anonymous, path):
    response = anonymous.get(path)
    assert response.status_code == 403 and "token" in response.text
    anonymous.cookies.set("mathtune_ui_8765", "wrong")
    assert anonymous.get(path).status_code == 403
    assert anonymous.get(f"{path}{'&' if '?' in path else '?'}token=wrong").status_code == 403


def test_the_token_in_the_url_becomes_a_strict_http_only_cookie_and_leaves_the_url(anonymous):
    response = anonymous.get(f"/new?model=&token={TOKEN}")
    assert response.status_code == 303 and response.headers["location"] == "/new?model="
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"mathtune_ui_8765={TOKEN};") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert anonymous.get("/").status_code == 200


@pytest.mark.parametrize("host,allowed", [("evil.example.com", False), ("evil.example.com:8765", False),
                                          ("127.0.0.1:8765", True), ("localhost:8765", True), ("[::1]:8765", True),
                                          ("192.168.1.20:8765", True), ("", False)])
def test_host_header_must_name_this_machine_against_dns_rebinding(client, host, allowed):
    response = client.get("/", headers={"host": host})
    assert (response.status_code == 200) == allowed
    if not allowed:
        assert response.status_code == 403 and "Host" in response.text


def test_state_changing_requests_need_the_csrf_token(app, client, runs, fake_popen):
    (runs / "r1").mkdir(parents=True)
    (runs / "r1" / "config.yaml").write_text("train: {max_steps: 3}\n")
    for path in ("/runs/r1/resume", "/runs/r1/stop", "/runs", "/api/estimate", "/data/upload", "/runs/r1/export"):
        assert client.post(path).status_code == 403, path
        assert client.post(path, headers={"X-CSRF-Token": "wrong"}).status_code == 403, path
    assert fake_popen.started == []
    assert client.post(f"/runs/r1/resume?csrf={app.state.csrf}").status_code == 303  # plain HTML form
    assert client.post("/runs/r1/stop", headers=csrf(app)).status_code == 303  # JavaScript


# -- Uploads and typed paths -----------------------------------------------------------------------


def test_upload_gets_a_generated_name_and_its_problems_with_line_numbers(app, client, runs):
    bad = "\n".join(json.dumps(r) for r in math_records(2)) + '\n{"instruction": "What is 3 + 3?"}\n'
    response = client.post("/data/upload", headers=csrf(app), files={"file": ("../../etc/evil.jsonl", bad.encode())})
    assert response.status_code == 303
    stored = list((runs / ".ui" / "uploads").iterdir())
    assert len(stored) == 1 and re.fullmatch(r"[0-9a-f]{32}\.jsonl", stored[0].name)
    assert not list(runs.parent.rglob("evil.jsonl"))
    page = client.get(response.headers["location"]).text
    assert "evil.jsonl:3</code>: output: missing (keys present: instruction)" in page
    assert 'id="start" disabled' in page


def test_upload_limits_size_and_kind(app, client, runs):
    too_big = b"[" + b" " * 5000 + b"]"
    response = client.post("/data/upload", headers=csrf(app), files={"file": ("big.json", too_big)})
    assert response.status_code == 413 and "limit" in response.text
    response = client.post("/data/upload", headers=csrf(app), files={"file": ("notes.txt", b"[]")})
    assert response.status_code == 400 and ".json or .jsonl" in response.text
    uploads = runs / ".ui" / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir())  # nothing kept, not even a .partial


def test_a_valid_file_shows_statistics(client, tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "good.jsonl", math_records(6))
    page = client.get("/new", params={"model": str(tiny_llama_dir), "data_path": str(data)}).text
    assert "Every record is valid (6 records)" in page
    assert 'id="stats"' in page and "arithmetic" in page and "<th>tokens</th>" in page


@pytest.mark.parametrize("params", [{"data_path": "/no/such/file.jsonl"}, {"data_path": "/"},
                                    {"data": "upload:../../../etc/passwd"}, {"data": "upload:" + "a" * 32 + ".sh"},
                                    {"model": "/etc/passwd"}, {"model": "/no/such/model.gguf"}])
def test_typed_paths_and_upload_names_are_checked_before_use(client, params):
    response = client.get("/new", params=params)
    assert response.status_code == 400 and 'class="note bad"' in response.text


def test_run_files_are_served_by_name_only(client, runs):
    (runs / "r1").mkdir(parents=True)
    (runs / "r1" / "config.yaml").write_text("{}\n")
    (runs / "r1" / "report.html").write_text("<p>report</p>")
    assert client.get("/runs/r1/files/report").text == "<p>report</p>"
    assert client.get("/runs/r1/files/config").status_code == 404
    assert client.get("/runs/r1/files/..%2F..%2Fetc%2Fpasswd").status_code == 404
    assert client.get("/runs/..%2Fr1/files/report").status_code == 404


# -- The settings form ----------------------------------------------------------------------------


def test_lm_studio_models_are_offered_with_what_mathtune_knows_of_them(client, tmp_path, monkeypatch, smollm_gguf):
    folder = tmp_path / "lmstudio" / "HuggingFaceTB" / "SmolLM2"
    folder.mkdir(parents=True)
    (folder / smollm_gguf.name).symlink_to(smollm_gguf)
    (folder / "broken.gguf").write_bytes(b"not a gguf")
    monkeypatch.setenv("MATHTUNE_LMSTUDIO_DIR", str(tmp_path / "lmstudio"))
    page = client.get("/new").text
    assert "Your LM Studio models" in page
    shown = r"[^>]*>\s*HuggingFaceTB/SmolLM2/SmolLM2.*?llama · 0\.13B · Q4_1"
    assert re.search(rf'value="{re.escape(str(folder / smollm_gguf.name))}"{shown}', page, re.S)
    assert re.search(r'value="[^"]*broken.gguf"[^>]*disabled', page)
    chosen = client.get("/new", params={"model": str(folder / smollm_gguf.name)}).text
    assert re.search(r'value="[^"]*SmolLM2[^"]*\.gguf"[^>]*\s*checked', chosen)


def test_the_form_comes_from_the_config_defaults_and_field_docs(client):
    from mathtune.config import TrainConfig

    page = client.get("/new").text
    assert 'name="train.learning_rate" value="0.002"' in page
    assert "Peak learning rate of SFT" in page  # the docstring under the field
    assert re.search(r'name="train.lr_scheduler"><option selected>cosine</option><option>linear</option>', page)
    assert TrainConfig.model_fields["learning_rate"].description.startswith("Peak learning rate of SFT")
    assert re.search(r'name="train.method"><option selected>sft</option><option>grpo</option><option>dpo</option>', page)
    assert 'name="grpo.num_generations" value="4"' in page and 'name="dpo.beta" value="0.1"' in page
    assert 'name="model.trust_remote_code"' not in page


def test_invalid_settings_get_the_validators_messages_next_to_their_fields(app, client, fake_popen):
    form = {"name": "r2", "train.batch_size": "0", "lora.r": "many", "model.device": "auto"}
    response = client.post("/runs", headers=csrf(app), data=form)
    assert response.status_code == 422
    assert re.search(r'data-key="train.batch_size">.*?Input should be greater than 0', response.text, re.S)
    assert re.search(r'data-key="lora.r">.*?Input should be a valid integer', response.text, re.S)
    assert fake_popen.started == []
    estimate = client.post("/api/estimate", headers=csrf(app), data={"train.batch_size": "0"}).json()
    assert estimate["problems"]["train.batch_size"] == ["Input should be greater than 0, got 0"]


def test_memory_estimate_is_the_doctors(app, client, tiny_llama_dir, monkeypatch):
    import mathtune.ui.form as form

    GIB = 1 << 30
    facts = form.machine_facts()
    monkeypatch.setitem(facts["memory"], "available", 12 * GIB)
    result = client.post("/api/estimate", headers=csrf(app), data={"model": str(tiny_llama_dir), "model.device": "cpu",
                                                                   "train.batch_size": "4"}).json()
    e = result["estimate"]
    assert result["problems"] == {} and e["fits"] is True and e["capacity_gib"] == 12.0 and e["device"] == "cpu"
    monkeypatch.setitem(facts["memory"], "available", 1000)
    form = {"model": str(tiny_llama_dir), "model.device": "cpu"}
    e = client.post("/api/estimate", headers=csrf(app), data=form).json()["estimate"]
    assert e["fits"] is False and e["total_gib"] > 0


def test_the_settings_form_accepts_4bit_on_a_cpu_where_bitsandbytes_works(app, client, tiny_llama_dir, monkeypatch):
    import mathtune.hardware
    import mathtune.ui.form as form

    monkeypatch.setattr(mathtune.hardware, "cuda_available", lambda: False)
    monkeypatch.setattr(mathtune.hardware, "bitsandbytes_available", lambda: True)
    facts = form.machine_facts()
    working = {"installed": True, "version": "0.50.2", "usable": True, "device": "cpu", "error": None}
    monkeypatch.setitem(facts, "bitsandbytes", working)
    monkeypatch.setitem(facts["memory"], "available", 12 << 30)
    data = {"model": str(tiny_llama_dir), "model.device": "cpu", "model.load_in_4bit": "on"}
    result = client.post("/api/estimate", headers=csrf(app), data=data).json()
    assert result["problems"] == {} and result["other"] == [] and result["estimate"]["fits"] is True
    monkeypatch.setitem(facts, "bitsandbytes", {**working, "usable": False, "error": "broken"})
    assert client.post("/api/estimate", headers=csrf(app), data=data).json()["estimate"]["fits"] is False


# -- Starting, stopping, resuming ------------------------------------------------------------------


def test_start_runs_mathtune_train_as_an_argument_list_with_the_saved_config(app, client, runs, tmp_path, fake_popen,
                                                                             tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("MATHTUNE_TRAIN__MAX_STEPS", "999")  # the server's environment, not the form
    data = write_jsonl(tmp_path / "d.jsonl", math_records(6))
    form = {"name": "r3; rm -rf ~", "model": str(tiny_llama_dir), "data": f"path:{data}", "train.max_steps": "3"}
    assert client.post("/runs", headers=csrf(app), data=form).status_code == 422  # not a run name
    form["name"] = "r3"
    response = client.post("/runs", headers=csrf(app), data=form)
    assert response.status_code == 303 and response.headers["location"] == "/runs/r3"
    saved = runs / ".ui" / "r3.yaml"
    assert fake_popen.started == [[sys.executable, "-m", "mathtune", "train", "--config", str(saved), "--output",
                                   str(runs / "r3")]]
    from mathtune.config import load_config

    cfg = load_config(saved, environ={})
    assert cfg.train.max_steps == 3 and cfg.model.path == str(tiny_llama_dir) and cfg.data.files == [data]
    assert client.get("/runs/r3").status_code == 200  # before the run has written its folder
    assert 'class="status running"' in client.get("/").text
    assert client.post("/runs", headers=csrf(app), data=form).status_code == 422  # the name is taken

    client.post("/runs/r3/stop", headers=csrf(app))
    proc = app.state.trainer.procs["r3"]
    expected = signal.CTRL_BREAK_EVENT if sys.platform == "win32" else signal.SIGINT
    assert proc.signals == [expected]  # what Ctrl-C sends: the run saves a checkpoint
    assert proc.kwargs.get("start_new_session") or proc.kwargs.get("creationflags")
    assert "MATHTUNE_TRAIN__MAX_STEPS" not in proc.kwargs["env"]
    assert client.post("/runs/r3/stop", headers=csrf(app)).status_code == 400  # not running any more

    (runs / "r3").mkdir()
    (runs / "r3" / "config.yaml").write_text(saved.read_text())
    assert client.post("/runs/r3/resume", headers=csrf(app)).status_code == 303
    assert fake_popen.started[-1] == [sys.executable, "-m", "mathtune", "train", "--resume", str(runs / "r3")]


def _run_folder(runs, name, log=None, summary=None, checkpoint=False):
    folder = runs / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("model: {path: /m/tiny}\ntrain: {max_steps: 10}\n")
    (folder / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 6.0}\n{"step": 2, "loss": 5.5, "num_input_tokens_seen": 100, '
                                          '"tokens_per_second": 50.0}\n{"step": 3, "lo')  # a line being written
    if log is not None:
        (runs / ".ui").mkdir(exist_ok=True)
        (runs / ".ui" / f"{name}.log").write_text(log)
    if summary:
        (folder / "train_summary.json").write_text(json.dumps(summary))
    if checkpoint:
        (folder / "checkpoints" / "checkpoint-2").mkdir(parents=True)
        (folder / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")


def test_runs_page_shows_each_status_from_the_run_folders(client, runs):
    _run_folder(runs, "done", summary={"steps": 10, "eval_loss_before": 6.0, "eval_loss_after": 5.0,
                                       "model": {"path": "/m/tiny"}})
    (runs / "done" / "eval").mkdir()
    (runs / "done" / "eval" / "summary.json").write_text(json.dumps(
        {"models": {"base": {"accuracy": 0.1}, "finetuned": {"accuracy": 0.25}}}))
    _run_folder(runs, "stopped", log="Interrupted at step 2; ...\n[mathtune ui] exit status 130\n")
    _run_folder(runs, "terminated", log="mathtune: error: Interrupted by SIGTERM at step 2; checkpoint saved in x\n")
    _run_folder(runs, "broken", log="mathtune: error: data.files: bad\n[mathtune ui] exit status 2\n")
    _run_folder(runs, "cli-stopped", checkpoint=True)
    _run_folder(runs, "unknown")
    page = client.get("/").text
    for name, status in [("done", "finished"), ("stopped", "interrupted"), ("terminated", "interrupted"), ("broken", "failed"),
                         ("cli-stopped", "interrupted"), ("unknown", "incomplete")]:
        assert re.search(rf'href="/runs/{name}">{name}</a></td>\s*<td><span class="status {status}"', page), name
    assert "6.000 → 5.000" in page and "10.0% → 25.0%" in page


def test_event_stream_sends_status_metrics_and_progress(client, runs):
    _run_folder(runs, "r4", log="step 0: eval loss 6.0\n")
    with client.stream("GET", "/runs/r4/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        line = next(line for line in response.iter_lines() if line.startswith("data: "))
    event = json.loads(line[len("data: "):])
    assert event["status"] == "incomplete" and [m["step"] for m in event["metrics"]] == [0, 2]
    assert event["progress"] == {"step": 2, "max_steps": 10, "tokens_per_second": 50.0, "seconds_left": 8}
    assert "eval loss 6.0" in event["log"]


def test_results_chat_and_export_need_a_finished_run(app, client, runs):
    _run_folder(runs, "r5")
    assert client.post("/runs/r5/export", headers=csrf(app), data={"what": "gguf-f16"}).status_code == 400
    assert client.post("/runs/r5/evaluate", headers=csrf(app)).status_code == 400
    assert client.get("/runs/r5/chat/stream", params={"q": "hi"}).status_code == 400
    assert "has not finished" in client.get("/runs/r5/export").text
    assert client.get("/runs/nope/results").status_code == 404


def test_spanish_follows_the_browser_and_can_be_switched(client):
    assert "<h1>Entrenamientos</h1>" in client.get("/", headers={"accept-language": "es-ES,es;q=0.9"}).text
    response = client.get("/lang", params={"to": "en", "next": "//evil.example.com"})
    assert response.status_code == 303 and response.headers["location"] == "/"
    assert "<h1>Runs</h1>" in client.get("/", headers={"accept-language": "es"}).text


def test_every_ui_string_has_both_languages():
    from mathtune.ui.i18n import STRINGS

    assert all(len(pair) == 2 and all(pair) for pair in STRINGS.values())


def test_ui_without_its_packages_says_how_to_install(monkeypatch, capsys):
    from mathtune.cli import main

    monkeypatch.setitem(sys.modules, "mathtune.ui.server", None)
    assert main(["ui", "--no-browser"]) == 2
    assert "pip install 'mathtune[ui]'" in capsys.readouterr().err


@pytest.mark.parametrize("host,warned", [("127.0.0.1", False), ("0.0.0.0", True)])
def test_ui_command_binds_localhost_by_default_and_warns_for_other_hosts(monkeypatch, capsys, tmp_path, host, warned):
    import uvicorn

    from mathtune.cli import main

    served = []

    def run(self, sockets):
        served.append(sockets[0].getsockname())
        sockets[0].close()

    monkeypatch.setattr(uvicorn.Server, "run", run)
    args = ["ui", "--runs", str(tmp_path), "--port", "0", "--no-browser"] + (["--host", host] if warned else [])
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert served[0][0] == host
    assert re.search(rf"open http://127\.0\.0\.1:{served[0][1]}/\?token=[\w-]{{20,}}", out)
    assert ("WARNING: listening on 0.0.0.0" in err) == warned


def test_the_export_page_shows_the_llama_cpp_check_of_each_gguf_and_offers_it(app, client, runs, monkeypatch):
    from mathtune.eval.confidence import interval
    from mathtune.ui import results

    _run_folder(runs, "r7", summary={"steps": 10})
    check = runs / "r7" / "eval" / "gguf" / "m-f16" / "summary.json"
    check.parent.mkdir(parents=True)
    check.write_text(json.dumps({
        "file": str(runs / "r7" / "export" / "m-f16.gguf"),
        "models": {"gguf": {"accuracy": 0.2192, "interval": interval(16, 73)},
                   "pytorch": {"accuracy": 0.2329, "interval": interval(17, 73)}},
        "change": {"p_value": 1.0}, "agreement": {"identical": 70, "checked": 73, "identical_share": 0.9589}}))
    (check.parent.parent / "half-written").mkdir()  # a folder without its summary yet: not shown
    monkeypatch.setattr(results, "llama_cpp_installed", lambda: True)
    page = client.get("/runs/r7/export").text
    assert 'id="checks"' in page and "m-f16.gguf" in page and "21.9% [14.0-32.7]" in page
    assert "70/73 (95.9%)" in page and 'name="check"' in page
    monkeypatch.setattr(results, "llama_cpp_installed", lambda: False)
    assert 'name="check"' not in client.get("/runs/r7/export").text  # nothing to check with
    assert "Comprobado con llama.cpp" in client.get("/runs/r7/export", headers={"accept-language": "es"}).text


def test_an_export_job_checked_with_llama_cpp_must_write_a_gguf(tmp_path):
    from mathtune.errors import MathtuneError
    from mathtune.ui.work import export

    with pytest.raises(MathtuneError, match="scores a GGUF file"):
        export(tmp_path, "hf", check=True)
