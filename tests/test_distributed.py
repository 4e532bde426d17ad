"""Several processes: two CPU ranks (torchrun, DDP over gloo) train the adapter one process trains
with the same global batch; rank 0 alone writes; launch combinations the engines cannot run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from mathtune import distributed
from mathtune.config import load_config
from mathtune.errors import ConfigError
from mathtune.train.recipe import train
from tests.conftest import ROOT, math_records, write_jsonl
from tests.train.test_recipe import adapter_weights

# 20 records, 4 held out: 16 training examples, 4 global batches of 4 per epoch, so no batch is
# short (a short last batch is filled up differently by one and by two processes).
SETTINGS = {
    # float32 on every CPU: the ranks' sums are compared to 1e-5, finer than bf16 rounding (~4e-3).
    "model.dtype": "float32",
    "data.eval_fraction": 0.2,
    "lora.r": 4,
    "lora.alpha": 8,
    "train.max_steps": 6,
    "train.learning_rate": 1e-2,
    "train.logging_steps": 1,
    "train.save_steps": 100,
    "eval.max_examples": 2,
    "eval.max_new_tokens": 4,
}


def torchrun(args: list[str], cwd, nproc: int = 2, timeout: int = 240, gpus: bool = False) -> subprocess.CompletedProcess:
    """`torchrun --standalone` (a free port of its own) running `python -m mathtune ARGS`, on CPU
    unless `gpus`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "mathtune", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def set_args(settings: dict) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def test_two_cpu_ranks_train_the_adapter_of_one_process_with_the_same_global_batch(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "math.jsonl", math_records(20))
    one = tmp_path / "one"
    single = train(load_config(overrides={"model.path": str(tiny_llama_dir), "data.files": [str(data)],
                                          "train.batch_size": 4, "eval.at_end": False, "output.dir": str(one),
                                          **SETTINGS}, environ={})).summary

    # No output.dir: each rank would name the folder from its own clock; rank 0's name must win.
    started = time.perf_counter()
    done = torchrun(["train", "--model", str(tiny_llama_dir), "--data", str(data),
                     *set_args({**SETTINGS, "train.batch_size": 2})], cwd=tmp_path)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["processes"] == 2 and summary["engine"] == "ddp"
    assert summary["steps"] == single["steps"] == 6
    # Tokens are counted over both ranks: each rank saw half of every global batch.
    assert summary["tokens_seen"] == single["tokens_seen"]

    expected, got = adapter_weights(one), adapter_weights(run)
    assert expected.keys() == got.keys()
    diff = max((got[name] - expected[name]).abs().max().item() for name in expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5)
    assert summary["eval_loss_after"] == pytest.approx(single["eval_loss_after"], rel=1e-4)

    # Rank 0 alone logs, writes metrics and scores the held-out answers; nobody waits for anybody.
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert done.stdout.count("Run folder:") == 1 and done.stdout.count("Done: 6 steps") == 1
    assert (run / "eval" / "summary.json").is_file() and (run / "report.html").is_file()
    print(f"two ranks: {seconds:.1f} s wall, {summary['tokens_per_second']} tokens/s; one process: "
          f"{single['tokens_per_second']} tokens/s; max |adapter difference| {diff:.2e}")


def test_a_refused_run_folder_stops_every_rank_with_rank_0s_message(tmp_path, tiny_llama_dir):
    data = write_jsonl(tmp_path / "math.jsonl", math_records(8))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("results")
    done = torchrun(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--output", "run"], cwd=tmp_path)
    assert done.returncode != 0
    # Both ranks stop with the same explanation (without the broadcast rank 1 would wait for rank 0 forever).
    assert done.stderr.count("the run folder exists and is not empty") == 2, done.stderr[-3000:]
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["precious.txt"]


@pytest.mark.parametrize(("env", "name", "sharded"), [
    ({}, "ddp", False),
    ({"ACCELERATE_USE_FSDP": "true"}, "fsdp", True),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "deepspeed-zero2", False),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "deepspeed-zero3", True),
])
def test_the_engine_is_read_from_what_accelerate_launch_sets(monkeypatch, env, name, sharded):
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed.engine() == name
    assert distributed.shards_parameters() is sharded
    assert distributed.engine_places_model() is (name != "ddp")


def test_qlora_and_cpu_under_a_sharding_engine_are_refused_before_loading(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = load_config(overrides={"model.device": "cpu", "model.path": str(tmp_path / "missing.gguf"),
                                 "output.dir": str(tmp_path / "run")}, environ={})
    cfg.model.load_in_4bit = True  # past the config's CUDA check: this machine has no GPU
    problems = distributed.launch_problems(cfg)
    assert len(problems) == 2
    assert problems[0].startswith("model.load_in_4bit: QLoRA runs on one GPU or under DDP")
    assert problems[1].startswith("model.device: fsdp needs CUDA GPUs")
    data = write_jsonl(tmp_path / "math.jsonl", math_records(8))
    cfg.data.files = [data]
    cfg.model.path = None
    with pytest.raises(ConfigError, match="fsdp needs CUDA GPUs"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step_with_a_checkpoint(tmp_path, tiny_llama_dir):
    # SLURM, Kubernetes and `timeout` stop a job with SIGTERM; torchrun passes it on to every rank.
    data = write_jsonl(tmp_path / "math.jsonl", math_records(20))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = tmp_path / "torchrun.log"
    settings = {**SETTINGS, "train.batch_size": 2, "train.max_steps": 400, "eval.at_end": False}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "mathtune", "train", "--model", str(tiny_llama_dir), "--data", str(data),
                                 "--output", "run", *set_args(settings)], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and '"loss"' in metrics.read_text()) and proc.poll() is None:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    text = log.read_text()
    stops = re.findall(r"Interrupted by SIGTERM at step (\d+)", text)
    assert len(stops) == 2 and stops[0] == stops[1], text[-3000:]  # both ranks, the same step
    checkpoint = tmp_path / "run" / "checkpoints" / f"checkpoint-{stops[0]}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == int(stops[0])
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}
    assert 0 < int(stops[0]) < 400 and "Resume with: mathtune train --resume run" in text
