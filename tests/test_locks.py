"""One process per run folder and per export output; resuming only with the run's own settings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mathtune.cli import main
from mathtune.config import Config, load_config
from mathtune.locks import InUseError, lock_output, lock_run_dir
from mathtune.run import RESUMABLE, create_run_dir, resume_changes
from mathtune.train.recipe import train
from tests.conftest import ROOT, math_records, write_jsonl
from tests.train.test_checkpoints import cli_args, start, wait_for
from tests.train.test_recipe import tiny_run_config

HOLD = """
import sys, time
from pathlib import Path
from mathtune.locks import lock_output, lock_run_dir
(lock_run_dir if sys.argv[2] == "run" else lock_output)(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(120)
"""


def hold(path: Path, kind: str = "run") -> subprocess.Popen:
    """Another process holding the lock of a run folder or an export output, until killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), kind], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)  # kill -9: the kernel releases the lock
    proc.wait()


def test_a_second_training_into_a_busy_run_folder_is_refused_with_the_first_ones_pid(tmp_path, tiny_llama_dir, capsys):
    data = write_jsonl(tmp_path / "math.jsonl", math_records(24))
    run, log = tmp_path / "run", tmp_path / "train.log"
    first = start(cli_args(data, tiny_llama_dir, run, 400), log)
    try:
        assert wait_for(lambda: (run / "metrics.jsonl").is_file(), first), log.read_text()[-3000:]
        files = sorted(p.name for p in run.iterdir())
        for argv in (["train", "--resume", str(run)],  # a second window
                     cli_args(data, tiny_llama_dir, run, 4) + ["--overwrite"],  # the same command, replacing it
                     cli_args(data, tiny_llama_dir, run, 4)):  # a UI double-click
            capsys.readouterr()
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert f"{run}: the run folder is in use by another mathtune process (PID {first.pid}, since " in err
            assert "Traceback" not in err
            assert sorted(p.name for p in run.iterdir()) == files  # the first run's folder is untouched
        assert first.poll() is None  # and the first run goes on
    finally:
        stop(first)
    lock_run_dir(run).release()  # kill -9 left no stale lock


def test_two_new_runs_that_chose_the_same_folder_the_second_stops_before_writing(tmp_path):
    run = tmp_path / "run"
    holder = hold(run)  # the first created it and holds it
    try:
        with pytest.raises(InUseError, match=f"PID {holder.pid}"):
            create_run_dir(run, "model: {}\n", resume=False)
        assert not (run / "config.yaml").exists()
    finally:
        stop(holder)


def test_overwrite_empties_the_folder_but_keeps_holding_it(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    lock = lock_run_dir(run)
    try:
        create_run_dir(run, "train: {}\n", resume=False)
        assert sorted(p.name for p in run.iterdir()) == [".mathtune.lock", ".mathtune.lock.owner", "config.yaml"]
        holder = subprocess.run([sys.executable, "-c", HOLD, str(run), "run"], capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
        assert holder.returncode == 1 and "is in use by another mathtune process" in holder.stderr
    finally:
        lock.release()


def test_an_export_into_an_output_another_export_is_writing_is_refused(tmp_path, tiny_llama_dir):
    from mathtune.export import export_run

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model: {{path: {tiny_llama_dir}}}\n")
    out = tmp_path / "x.gguf"
    holder = hold(out, "output")
    try:
        with pytest.raises(InUseError, match=f"{out} is in use by another mathtune process \\(PID {holder.pid}"):
            export_run(run, "gguf", output=out)
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    finally:
        stop(holder)
    lock_output(out).release()


# ---------------------------------------------------------------------------------------------
# --resume with other settings


def test_resume_changes_sort_the_allowed_from_the_refused():
    saved = load_config(environ={})
    new = load_config(overrides={"train.max_steps": 200, "eval.max_examples": 5, "lora.r": 8,
                                 "lora.target_modules": ["q_proj", "v_proj"], "data.files": ["other.jsonl"],
                                 "model.path": "other.gguf"}, environ={})
    allowed, refused = resume_changes(saved, new)
    assert allowed == [f"eval.max_examples: {saved.eval.max_examples} -> 5", f"train.max_steps: {saved.train.max_steps} -> 200"]
    assert refused == ["data.files: [] -> ['other.jsonl']", f"lora.r: {saved.lora.r} -> 8",
                       "lora.target_modules: 'all-linear' -> ['q_proj', 'v_proj']", "model.path: None -> 'other.gguf'"]
    assert resume_changes(saved, load_config(environ={})) == ([], [])
    # Every allowed key exists, and says why.
    keys = {f"{s}.{k}" for s in Config.model_fields for k in Config.model_fields[s].annotation.model_fields}
    assert all(key in keys or key.endswith(".*") for key in RESUMABLE) and all(RESUMABLE.values())


def test_resume_with_other_data_model_or_lora_is_refused_listing_the_keys(tmp_path, tiny_llama_dir, capsys):
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, max_steps=3)
    run = cfg.output.dir
    train(cfg)
    saved = (run / "config.yaml").read_text()
    other = write_jsonl(tmp_path / "other.jsonl", math_records(10))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--data", str(other), "--set", "lora.r=8",
                 "--set", "lora.target_modules=[q_proj]"]) == 2
    err = capsys.readouterr().err
    assert "--resume with settings that differ from the run's" in err and "Traceback" not in err
    for line in (f"data.files: ['{tmp_path / 'math.jsonl'}'] -> ['{other}']", "lora.r: 4 -> 8",
                 "lora.target_modules: 'all-linear' -> ['q_proj']"):
        assert f"  - {line}\n" in err
    assert "Settings that may change on resume: train.max_steps" in err
    assert (run / "config.yaml").read_text() == saved

    # Training longer is allowed, and the run's config.yaml says so from now on.
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=5", "--set", "eval.at_end=false"]) == 0
    assert json.loads((run / "train_summary.json").read_text())["steps"] == 5
    assert load_config(run / "config.yaml", environ={}).train.max_steps == 5


def test_the_lock_is_released_when_the_run_ends_so_the_next_process_can_resume(tmp_path, tiny_llama_dir):
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, max_steps=2)
    cfg.eval.at_end = False
    train(cfg)
    holder = hold(cfg.output.dir)  # another process gets the folder: this one let it go
    stop(holder)


def test_a_second_export_from_another_thread_of_the_same_process_is_refused(tmp_path):
    # The UI runs exports in threads: a double-click must not start a second writer there either.
    import threading

    out, taken, done = tmp_path / "x.gguf", threading.Event(), threading.Event()

    def first_export():
        lock = lock_output(out)
        taken.set()
        done.wait(30)
        lock.release()

    worker = threading.Thread(target=first_export)
    worker.start()
    try:
        assert taken.wait(30)
        with pytest.raises(InUseError, match=f"in use by another mathtune job of this process \\(PID {os.getpid()}"):
            lock_output(out)
    finally:
        done.set()
        worker.join()
    lock_output(out).release()  # free again once the first is done
