"""train.report_to: the real TensorBoard, MLflow and wandb (offline) files of a tiny run, read back
with each library's own reader; the missing-package error; the default that reports nowhere."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import struct

import pytest

from mathtune.cli import main
from mathtune.config import load_config
from mathtune.errors import ConfigError
from mathtune.train.recipe import train
from tests.train.test_recipe import tiny_run_config

TRACKER_ENV = ("TENSORBOARD_LOGGING_DIR", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID",
               "WANDB_DIR", "WANDB_PROJECT", "WANDB_MODE", "WANDB_API_KEY", "TRACKIO_DIR")


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No tracker settings of the developer's, and a working folder of its own (nothing may land there)."""
    for name in TRACKER_ENV:
        monkeypatch.delenv(name, raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_tensorboard_mlflow_and_wandb_get_the_losses_tokens_per_second_and_accuracies(
        tmp_path, tiny_llama_dir, clean_env, monkeypatch):
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, report_to=["tensorboard", "mlflow", "wandb"])
    train(cfg)
    run = tmp_path / "run"
    assert not any(clean_env.iterdir())  # nothing in the working folder (./mlruns, ./mlflow.db, ./wandb, ./runs)
    assert not {"MLFLOW_TRACKING_URI", "WANDB_DIR", "WANDB_PROJECT"} & set(os.environ)  # the defaults were put back
    accuracy = json.loads((run / "eval" / "summary.json").read_text())["models"]
    steps = [1, 2, 3, 4, 5, 6]

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/tokens_per_second", "eval/loss", "eval/accuracy",
            "eval/base_accuracy"} <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == steps
    assert all(e.value > 0 for e in events.Scalars("train/tokens_per_second"))
    assert [e.step for e in events.Scalars("eval/loss")] == [0, 6]  # before and after training
    [tuned] = events.Scalars("eval/accuracy")
    assert tuned.step == 6 and tuned.value == pytest.approx(accuracy["finetuned"]["accuracy"])
    assert events.Scalars("eval/base_accuracy")[0].value == pytest.approx(accuracy["base"]["accuracy"])

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{(run / 'mlflow.db').as_posix()}")
    [found] = mlflow.search_runs(search_all_experiments=True).to_dict("records")  # one run, closed once
    assert found["tags.mlflow.runName"] == "run" and found["status"] == "FINISHED"
    for name in ("loss", "learning_rate", "tokens_per_second", "eval_loss"):
        assert found[f"metrics.{name}"] is not None, name
    assert found["metrics.eval_accuracy"] == pytest.approx(accuracy["finetuned"]["accuracy"])
    assert found["metrics.eval_base_accuracy"] == pytest.approx(accuracy["base"]["accuracy"])
    history = mlflow.MlflowClient().get_metric_history(found["run_id"], "loss")
    assert sorted(m.step for m in history) == steps

    [wandb_run] = (run / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_records(wandb_run))
    [started] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert started.display_name == "run" and started.project == "mathtune"
    history = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["train/global_step"] for h in history if "train/loss" in h] == steps
    assert all(h["train/tokens_per_second"] > 0 and "train/learning_rate" in h for h in history if "train/loss" in h)
    assert [h["train/global_step"] for h in history if "eval/loss" in h] == [0, 6]
    [final] = [h for h in history if "eval/accuracy" in h]
    assert final["eval/accuracy"] == pytest.approx(accuracy["finetuned"]["accuracy"])
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(_items(r.summary.update))
    assert summary["eval/accuracy"] == pytest.approx(accuracy["finetuned"]["accuracy"]) and "train/loss" in summary
    assert any(r.WhichOneof("record_type") == "exit" for r in records)  # the run was finished



def test_trackio_gets_the_losses_and_accuracies(tmp_path, tiny_llama_dir, clean_env, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    pytest.importorskip("trackio")  # not in the dev extra (it brings gradio_client and more)
    from trackio.sqlite_storage import SQLiteStorage

    cfg = tiny_run_config(tmp_path, tiny_llama_dir, report_to=["trackio"])
    train(cfg)
    logs = SQLiteStorage.get_logs(project="mathtune", run="run")
    assert [e["train/global_step"] for e in logs if "train/loss" in e] == [1, 2, 3, 4, 5, 6]
    assert all(e["train/tokens_per_second"] > 0 for e in logs if "train/loss" in e)
    assert any("eval/accuracy" in e for e in logs) and any("eval/loss" in e for e in logs)
    assert not any(clean_env.iterdir())


def test_a_tracker_that_is_not_installed_is_named_with_its_pip_command(tmp_path, clean_env, monkeypatch, capsys):
    real = importlib.util.find_spec
    missing = {"mlflow", "wandb"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name in missing else real(name, *a, **k))

    with pytest.raises(ConfigError) as err:
        load_config(overrides={"train.report_to": ["tensorboard", "mlflow", "wandb"]}, environ={})
    assert err.value.problems == ['train.report_to: "mlflow" needs the mlflow package: pip install mlflow',
                                  'train.report_to: "wandb" needs the wandb package: pip install wandb']
    # Planning for another machine (mathtune doctor) does not look at this one's packages.
    load_config(overrides={"train.report_to": ["mlflow"]}, environ={}, check_machine=False)

    # Before anything is loaded or written: no run folder.
    assert main(["train", "--set", "train.report_to=[wandb]", "--output", str(tmp_path / "run")]) == 2
    assert 'train.report_to: "wandb" needs the wandb package: pip install wandb' in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

    # mlflow-skinny: the package is there, its local database is not (unless a server is named).
    missing.clear()
    missing.add("sqlalchemy")
    with pytest.raises(ConfigError, match=r"needs the full mlflow package .*: pip install mlflow"):
        load_config(overrides={"train.report_to": ["mlflow"]}, environ={})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert load_config(overrides={"train.report_to": ["mlflow"]}, environ={}).train.report_to == ["mlflow"]


def test_report_to_takes_only_the_known_trackers():
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"train.report_to": ["tensorbord"]}, environ={})
    [problem] = err.value.problems
    assert problem.startswith("train.report_to: Input should be 'tensorboard', 'mlflow', 'wandb' or 'trackio'")
    assert "'tensorbord'" in problem
    assert load_config(environ={"MATHTUNE_TRAIN__REPORT_TO": "tensorboard"}).train.report_to == ["tensorboard"]


def test_the_default_run_reports_nowhere_and_connects_nowhere(tmp_path, tiny_llama_dir, clean_env, monkeypatch):
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, max_steps=2, save_steps=2)
    assert cfg.train.report_to == []
    result = train(cfg)

    assert attempts == []
    run = tmp_path / "run"
    assert not {"tensorboard", "mlflow.db", "mlruns", "wandb"} & {p.name for p in run.iterdir()}
    assert not list(run.rglob("events.out.tfevents*"))
    assert not any(clean_env.iterdir())
    assert result.summary["steps"] == 2


def wandb_records(path):
    """The records of an offline run's .wandb file: wandb's header (":W&B", magic, version), then
    LevelDB's log format (32 KiB blocks of chunks: crc32, length, type 1 full / 2 first / 3 middle /
    4 last), each record a wandb_internal_pb2.Record. wandb 0.2x has no Python reader of its own."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
