"""Interruptions lose nothing: whole checkpoints only, Ctrl-C, kill -9, NaN loss, full disk, tampered files."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mathtune.cli import main
from mathtune.errors import MathtuneError
from mathtune.train.checkpoints import (
    PARTIAL,
    GracefulInterrupt,
    TrainingInterrupted,
    TrainingStopped,
    last_checkpoint,
    rotate_checkpoints,
    stop_signals,
)
from mathtune.train.recipe import RunTrainer, save_adapter, train
from tests.conftest import math_records, write_jsonl
from tests.train.test_recipe import adapter_weights, tiny_run_config

CHECKPOINT_FILES = {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                    "rng_state.pth", "trainer_state.json"}


def assert_same_adapter(a: Path, b: Path) -> None:
    expected, got = adapter_weights(a), adapter_weights(b)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)


def assert_only_complete_checkpoints(run: Path) -> list[int]:
    """Every checkpoint-N folder where --resume looks is whole; returns their steps."""
    steps = []
    for folder in (run / "checkpoints").glob("checkpoint-*"):
        assert CHECKPOINT_FILES <= {p.name for p in folder.iterdir()}, folder
        state = json.loads((folder / "trainer_state.json").read_text())
        assert state["global_step"] == int(folder.name.split("-")[1])
        load_file(folder / "adapter_model.safetensors")
        torch.load(folder / "optimizer.pt", weights_only=True)
        steps.append(state["global_step"])
    return sorted(steps)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_llama_dir) -> Path:
    """The uninterrupted 6-step run that interrupted ones must reproduce."""
    folder = tmp_path_factory.mktemp("straight")
    train(tiny_run_config(folder, tiny_llama_dir))
    return folder / "run"


# ---------------------------------------------------------------------------------------------
# Complete checkpoints only


def test_last_checkpoint_skips_folders_that_are_not_complete(tmp_path):
    root = tmp_path / "checkpoints"
    for step, state in [(2, '{"global_step": 2}'), (4, None), (5, '{"global_st'), (7, None)]:
        (root / f"checkpoint-{step}").mkdir(parents=True)
        if state is not None:
            (root / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (root / PARTIAL / "checkpoint-9").mkdir(parents=True)
    (root / PARTIAL / "checkpoint-9" / "trainer_state.json").write_text('{"global_step": 9}')
    (root / "checkpoint-x").mkdir()
    assert last_checkpoint(root) == root / "checkpoint-2"


def test_a_crash_while_saving_leaves_the_previous_checkpoint_to_resume_from(tmp_path, tiny_llama_dir, straight_run,
                                                                             monkeypatch):
    cfg = tiny_run_config(tmp_path, tiny_llama_dir)
    real = RunTrainer._save_rng_state

    def dies_at_step_6(self, output_dir):
        if self.state.global_step == 6:
            raise SystemExit("killed while writing checkpoint-6")  # the optimizer state is already written
        return real(self, output_dir)

    monkeypatch.setattr(RunTrainer, "_save_rng_state", dies_at_step_6)
    with pytest.raises(SystemExit):
        train(cfg)
    run = tmp_path / "run"
    assert (run / "checkpoints" / PARTIAL / "checkpoint-6" / "optimizer.pt").is_file()  # the half-written one
    assert assert_only_complete_checkpoints(run) == [3]
    monkeypatch.undo()

    assert main(["train", "--resume", str(run)]) == 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-3") and summary["steps"] == 6
    assert_same_adapter(straight_run, run)
    assert assert_only_complete_checkpoints(run) == [3, 6]
    assert not (run / "checkpoints" / PARTIAL / "checkpoint-6").exists()


def test_a_kill_while_a_checkpoint_is_replaced_leaves_nothing_rotation_counts(tmp_path, monkeypatch):
    """Publishing over an existing checkpoint-N moves the old one aside until the new one is in
    place; killed before it is deleted, the old one's name must not look like a checkpoint to
    transformers' sort_checkpoints (checkpoint-2.old did: rotation then deleted the real checkpoint-2
    and kept the leftover)."""
    import shutil

    from mathtune.files import publish

    root = tmp_path / "checkpoints"
    for step in (2, 3):
        (root / f"checkpoint-{step}").mkdir(parents=True)
        (root / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    staged = root / PARTIAL / "checkpoint-2"
    staged.mkdir(parents=True)
    (staged / "trainer_state.json").write_text('{"new": true}')

    def killed(path, ignore_errors=False):
        if not ignore_errors:
            raise SystemExit("killed")

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(SystemExit):
        publish(staged, root / "checkpoint-2")
    monkeypatch.undo()
    assert json.loads((root / "checkpoint-2" / "trainer_state.json").read_text()) == {"new": True}
    rotate_checkpoints(root, limit=2)
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def test_a_kill_while_an_old_checkpoint_is_deleted_leaves_no_half_checkpoint_where_resume_looks(tmp_path,
                                                                                                  monkeypatch):
    """Rotation (save_total_limit) deletes the oldest checkpoint file by file; killed in the middle
    (here: the deletion stops after the adapter), the half-deleted folder is in .partial, not at
    checkpoint-N (transformers' own rotation deletes it in place: a checkpoint-1 without its adapter,
    which the kill -9 test below caught once)."""
    import shutil

    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        for name in sorted(CHECKPOINT_FILES):
            (folder / name).write_text(json.dumps({"global_step": step}))

    def killed_midway(path, ignore_errors=False):
        (Path(path) / "adapter_model.safetensors").unlink(missing_ok=True)
        raise SystemExit("killed")

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(SystemExit):
        rotate_checkpoints(root, limit=2)
    monkeypatch.undo()
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert all(CHECKPOINT_FILES <= {f.name for f in (root / name).iterdir()} for name in ("checkpoint-2", "checkpoint-3"))
    assert (root / PARTIAL / "checkpoint-1.deleted").is_dir()

    (root / "checkpoint-4").mkdir()
    (root / "checkpoint-4" / "trainer_state.json").write_text("{}")
    rotate_checkpoints(root, limit=2, best=str(root / "checkpoint-2"))  # the best is kept, as transformers keeps it
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (root / PARTIAL).exists()  # the leftover is gone with the next deletion


def test_killed_after_the_final_checkpoint_a_resume_trains_no_extra_step(tmp_path, straight_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    shutil.rmtree(run / "adapter")
    (run / "train_summary.json").unlink()
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(str(straight_run), str(run)))

    assert main(["train", "--resume", str(run)]) == 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["steps_this_session"] == 0
    assert_same_adapter(straight_run, run)


# ---------------------------------------------------------------------------------------------
# kill -9 of a real training process


def cli_args(data: Path, model: Path, out: Path, steps: int) -> list[str]:
    sets = {"data.eval_fraction": 0.25, "lora.r": 4, "lora.alpha": 8, "train.max_steps": steps,
            "train.batch_size": 4, "train.learning_rate": 1e-2, "train.logging_steps": 1, "train.save_steps": 1,
            "train.save_total_limit": 2, "eval.at_end": "false"}
    args = ["train", "--model", str(model), "--data", str(data), "--output", str(out)]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


def start(args: list[str], log: Path) -> subprocess.Popen:
    with log.open("ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "mathtune", *args], stdout=fh, stderr=subprocess.STDOUT,
                                env=os.environ.copy(), cwd=Path(__file__).resolve().parents[2])


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240) -> bool:
    """Poll until `condition()` holds (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("training made no progress")


def newest_step(run: Path) -> int:
    found = last_checkpoint(run / "checkpoints")
    return int(found.name.split("-")[1]) if found else 0


@pytest.mark.parametrize("kills", [pytest.param(2, id="2 kills"), pytest.param(5, id="5 kills", marks=pytest.mark.slow)])
def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_llama_dir, kills):
    steps = 16
    data = write_jsonl(tmp_path / "math.jsonl", math_records(24))
    assert main(cli_args(data, tiny_llama_dir, tmp_path / "straight", steps)) == 0

    run, log = tmp_path / "run", tmp_path / "train.log"
    rng = random.Random(7)
    killed_mid_training = 0
    for _ in range(kills):
        before = newest_step(run)
        args = cli_args(data, tiny_llama_dir, run, steps)
        proc = start(args[:1] + ["--resume", str(run)] if (run / "config.yaml").is_file() else args, log)
        # Wait until this attempt has saved a checkpoint of its own, then kill it at a random moment
        # of the steps and saves that follow (each step here is a few tens of milliseconds).
        if wait_for(lambda: newest_step(run) > before, proc):  # noqa: B023 - called before `before` changes
            time.sleep(rng.uniform(0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed_mid_training += newest_step(run) < steps
        else:
            assert proc.returncode == 0, log.read_text()[-3000:]
        assert_only_complete_checkpoints(run)
    assert killed_mid_training >= 1, "every kill came too late to interrupt training"

    assert main(["train", "--resume", str(run)]) == 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == steps
    assert_same_adapter(tmp_path / "straight", run)
    straight = json.loads((tmp_path / "straight" / "train_summary.json").read_text())
    assert summary["eval_loss_after"] == pytest.approx(straight["eval_loss_after"], rel=1e-4)
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r] == list(range(1, steps + 1))


# ---------------------------------------------------------------------------------------------
# Ctrl-C


STOP_SIGNALS = [pytest.param(signal.SIGINT, 130, "", id="Ctrl-C"),
                pytest.param(signal.SIGTERM, 143, " by SIGTERM", id="SIGTERM"),
                pytest.param(getattr(signal, "SIGHUP", None), 129, " by SIGHUP", id="SIGHUP",
                             marks=pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on Windows"))]


@pytest.mark.parametrize(("signum", "status", "said"), STOP_SIGNALS)
def test_a_stop_signal_stops_after_the_step_saves_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_llama_dir, signum,
                                                                                      status, said):
    steps = 60
    data = write_jsonl(tmp_path / "math.jsonl", math_records(24))
    run, log = tmp_path / "run", tmp_path / "train.log"
    args = cli_args(data, tiny_llama_dir, run, steps) + ["--set", "train.save_steps=1000"]
    proc = start(args, log)
    metrics = run / "metrics.jsonl"
    assert wait_for(lambda: metrics.is_file() and '"loss"' in metrics.read_text(), proc), log.read_text()[-3000:]
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == status, log.read_text()[-3000:]
    out = log.read_text()
    assert "Traceback" not in out
    assert "stopping after this step" in out
    stopped = last_checkpoint(run / "checkpoints")
    assert stopped is not None and 0 < int(stopped.name.split("-")[1]) < steps
    assert f"Interrupted{said} at step {stopped.name.split('-')[1]}" in out
    assert f"Resume with: mathtune train --resume {run}" in out
    assert not (run / "adapter").exists() and not (run / "train_summary.json").exists()
    assert_only_complete_checkpoints(run)
    if signum != signal.SIGINT:
        return  # the same checkpoint as after Ctrl-C: resuming from it is shown once, below

    assert main(["train", "--resume", str(run)]) == 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["resumed_from"] == str(stopped) and summary["steps"] == steps


def test_a_second_ctrl_c_aborts_at_once():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite was started in the background
    interrupt = GracefulInterrupt()
    with interrupt.installed():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert interrupt.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on Windows")
@pytest.mark.parametrize("signum", [signal.SIGTERM, getattr(signal, "SIGHUP", None)], ids=["SIGTERM", "SIGHUP"])
def test_a_second_signal_aborts_at_once_with_its_status_and_the_handlers_are_restored(signum, capsys):
    before = {s: signal.getsignal(s) for s in stop_signals()}
    interrupt = GracefulInterrupt()
    with interrupt.installed():
        os.kill(os.getpid(), signum)
        time.sleep(0.01)
        assert interrupt.signum == signum
        assert f"{signum.name} received: stopping after this step" in capsys.readouterr().err
        with pytest.raises(SystemExit) as exc:
            os.kill(os.getpid(), signum)
            time.sleep(0.5)
    assert exc.value.code == 128 + signum
    assert {s: signal.getsignal(s) for s in stop_signals()} == before


def test_the_interrupt_asks_the_trainer_to_save_and_stop():
    from transformers import TrainerControl, TrainerState, TrainingArguments

    interrupt = GracefulInterrupt()
    args, state, control = TrainingArguments(output_dir="unused", use_cpu=True), TrainerState(), TrainerControl()
    state.global_step = 7
    interrupt.on_step_end(args, state, control)
    assert not control.should_save and not control.should_training_stop and interrupt.stopped_at is None
    interrupt.signum = signal.SIGTERM
    interrupt.on_step_end(args, state, control)
    assert control.should_save and control.should_training_stop and interrupt.stopped_at == 7
    error = interrupt.error(Path("run/checkpoints/checkpoint-7"), Path("run"))
    assert str(error) == ("Interrupted by SIGTERM at step 7; checkpoint saved in run/checkpoints/checkpoint-7. "
                          "Resume with: mathtune train --resume run")
    assert error.exit_code == 143 and TrainingInterrupted("x").exit_code == 130


# ---------------------------------------------------------------------------------------------
# NaN loss


def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_llama_dir,
                                                                                   monkeypatch, capsys):
    real = RunTrainer.compute_loss

    def nan_from_step_5(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if model.training and self.state.global_step >= 4 else loss

    monkeypatch.setattr(RunTrainer, "compute_loss", nan_from_step_5)
    cfg = tiny_run_config(tmp_path, tiny_llama_dir)
    assert main(["train", "--config", str(write_config(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err
    run = tmp_path / "run"
    assert "The training loss is nan at step 5 (of 6)" in err
    assert f"The last good checkpoint is {run / 'checkpoints' / 'checkpoint-3'}" in err
    assert "train.learning_rate" in err and "Traceback" not in err
    assert assert_only_complete_checkpoints(run) == [3]
    assert not (run / "adapter").exists()
    weights = load_file(run / "checkpoints" / "checkpoint-3" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def write_config(tmp_path: Path, cfg) -> Path:
    from mathtune.config import dump_config

    path = tmp_path / "run.yaml"
    path.write_text(dump_config(cfg))
    return path


def test_a_huge_learning_rate_is_caught_as_a_non_finite_loss(tmp_path, tiny_llama_dir):
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, learning_rate=1e30, max_grad_norm=1e30, max_steps=20,
                          save_steps=1)
    with pytest.raises(TrainingStopped, match=r"The training loss is (nan|inf|-inf) at step \d+ \(of 20\)") as excinfo:
        train(cfg)
    step = int(str(excinfo.value).split(" at step ")[1].split()[0])
    assert assert_only_complete_checkpoints(tmp_path / "run")[-1] == step - 1


# ---------------------------------------------------------------------------------------------
# Disk full


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, tiny_llama_dir, monkeypatch):
    real = torch.save

    def disk_full_at_step_6(obj, f, *args, **kwargs):
        if "checkpoint-6" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_6)
    with pytest.raises(TrainingStopped) as excinfo:
        train(tiny_run_config(tmp_path, tiny_llama_dir))
    run = tmp_path / "run"
    message = str(excinfo.value)
    assert f"Could not save checkpoint-6 in {run / 'checkpoints'}: the disk is full" in message
    assert f"the previous checkpoint {run / 'checkpoints' / 'checkpoint-3'} is intact" in message
    assert f"mathtune train --resume {run}" in message
    assert assert_only_complete_checkpoints(run) == [3]
    assert not (run / "checkpoints" / PARTIAL / "checkpoint-6").exists()


def test_a_full_disk_while_saving_the_adapter_keeps_the_previous_adapter(tmp_path, chatml_tokenizer):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "adapter_model.safetensors").write_bytes(b"previous")

    class FullDisk:
        def save_pretrained(self, folder, **kwargs):
            Path(folder).mkdir(parents=True)
            (Path(folder) / "adapter_model.safetensors").write_bytes(b"half")
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                               "message: \"No space left on device\" })")  # what safetensors raises

    with pytest.raises(MathtuneError, match="the disk is full; the previous adapter is intact"):
        save_adapter(FullDisk(), chatml_tokenizer, target)
    assert (target / "adapter_model.safetensors").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# ---------------------------------------------------------------------------------------------
# Untrusted files in a checkpoint


class Payload:
    """Unpickling this runs a command: what a tampered checkpoint file would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_optimizer_state_is_refused_without_running_it(tmp_path, tiny_llama_dir, straight_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight_run, run)
    shutil.rmtree(run / "checkpoints" / "checkpoint-6")
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, run / "checkpoints" / "checkpoint-3" / "optimizer.pt")
    cfg_text = (run / "config.yaml").read_text().replace(str(straight_run), str(run))
    (run / "config.yaml").write_text(cfg_text)

    with pytest.raises(MathtuneError, match=r"checkpoint-3: refused to load it: a file in it holds Python objects"):
        from mathtune.config import load_config

        train(load_config(run / "config.yaml", environ={}), resume=True)
    assert not marker.exists()
