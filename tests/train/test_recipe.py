"""The training recipe end to end on a tiny llama folder: run folder, reproducibility, resume."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mathtune import hardware
from mathtune.cli import main
from mathtune.config import load_config
from mathtune.errors import MathtuneError
from mathtune.train import recipe
from mathtune.train.recipe import last_checkpoint, train
from tests.conftest import math_records, write_jsonl


def tiny_run_config(tmp_path, model_dir, **train_overrides):
    data = write_jsonl(tmp_path / "math.jsonl", math_records(24))
    overrides = {
        "model.path": str(model_dir),
        "data.files": [str(data)],
        "data.eval_fraction": 0.25,
        "lora.r": 4,
        "lora.alpha": 8,
        "train.max_steps": 6,
        "train.batch_size": 4,
        "train.learning_rate": 1e-2,
        "train.logging_steps": 1,
        "train.save_steps": 3,
        "train.save_total_limit": 5,
        "eval.max_examples": 3,
        "eval.max_new_tokens": 6,
        "output.dir": str(tmp_path / "run"),
    }
    overrides.update({f"train.{k}": v for k, v in train_overrides.items()})
    return load_config(overrides=overrides, environ={})


def adapter_weights(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_run_folder_has_adapter_config_metrics_and_summary(tmp_path, tiny_llama_dir, monkeypatch):
    events = []
    scoring = recipe.evaluate_model
    monkeypatch.setattr(hardware, "release_freed_memory", lambda: events.append("freed heap handed back"))
    monkeypatch.setattr(recipe, "evaluate_model", lambda *a, **k: events.append("scored") or scoring(*a, **k))
    cfg = tiny_run_config(tmp_path, tiny_llama_dir)
    result = train(cfg)
    summary, run = result.summary, tmp_path / "run"
    # Training ran with the lean norms and MLPs (mathtune/train/blocks.py: 2 layers of 2 norms and an
    # MLP, and the final norm), and scoring started on the heap the training left, handed back.
    lean = [type(m).__name__ for m in result.model.modules() if "forward" in vars(m) and "Llama" in type(m).__name__]
    assert sorted(lean) == ["LlamaMLP"] * 2 + ["LlamaRMSNorm"] * 5
    assert events == ["freed heap handed back", "scored"]

    assert {"adapter", "checkpoints", "config.yaml", "metrics.jsonl", "train_summary.json"} <= {p.name for p in run.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in (run / "adapter").iterdir()
    }
    assert json.loads((run / "train_summary.json").read_text()) == summary
    assert summary["steps"] == 6 and summary["train_examples"] == 18 and summary["eval_examples"] == 6
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert summary["tokens_seen"] > 0 and summary["tokens_per_second"] > 0

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [entry for entry in lines if "loss" in entry]
    assert [entry["step"] for entry in train_lines] == [1, 2, 3, 4, 5, 6]
    assert all(entry["tokens_per_second"] > 0 and "learning_rate" in entry for entry in train_lines)
    assert lines[0]["step"] == 0 and "eval_loss" in lines[0]
    # Saved config is the resolved one, and reproduces this run's configuration exactly.
    assert load_config(run / "config.yaml", environ={}) == cfg
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]


def test_an_existing_run_is_never_overwritten_without_asking(tmp_path, tiny_llama_dir):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("results")
    cfg = tiny_run_config(tmp_path, tiny_llama_dir)
    with pytest.raises(MathtuneError, match="--overwrite"):
        train(cfg)
    assert (run / "precious.txt").read_text() == "results"


def test_config_yaml_of_a_run_reproduces_it_through_the_cli(tmp_path, tiny_llama_dir):
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, max_steps=2, save_steps=2)
    first = train(cfg).summary
    again = tmp_path / "again"
    assert main(["train", "--config", str(tmp_path / "run" / "config.yaml"), "--output", str(again)]) == 0
    second = json.loads((again / "train_summary.json").read_text())
    assert second["first_train_loss"] == pytest.approx(first["first_train_loss"], rel=1e-5)
    assert second["eval_loss_after"] == pytest.approx(first["eval_loss_after"], rel=1e-5)
    saved = yaml.safe_load((again / "config.yaml").read_text())
    assert saved["output"]["dir"] == str(again) and saved["train"]["max_steps"] == 2


def test_resume_after_a_checkpoint_ends_with_the_uninterrupted_adapter(tmp_path, tiny_llama_dir):
    straight_dir, stopped_dir = tmp_path / "straight", tmp_path / "stopped"
    straight_dir.mkdir(), stopped_dir.mkdir()
    train(tiny_run_config(straight_dir, tiny_llama_dir))

    stopped = tiny_run_config(stopped_dir, tiny_llama_dir)
    train(stopped)
    run = stopped_dir / "run"
    # Simulate a run that died after its step-3 checkpoint: later state is gone.
    shutil.rmtree(run / "checkpoints" / "checkpoint-6")
    shutil.rmtree(run / "adapter")
    (run / "train_summary.json").unlink()
    assert last_checkpoint(run).name == "checkpoint-3"

    assert main(["train", "--resume", str(run)]) == 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-3") and summary["steps"] == 6
    assert summary["steps_this_session"] == 3
    assert summary["eval_loss_before"] is not None

    expected, resumed = adapter_weights(straight_dir / "run"), adapter_weights(run)
    assert expected.keys() == resumed.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-4, atol=1e-5)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == [1, 2, 3, 4, 5, 6]  # the replayed steps are not logged twice


def test_resume_of_a_folder_that_is_not_a_run_says_so(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a mathtune run folder" in capsys.readouterr().err


def test_bad_records_are_reported_before_any_folder_is_written_or_model_loaded(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "2+2?", "output": "4"}, {"instruction": "3+3?"}])
    cfg = load_config(overrides={"model.path": str(tmp_path / "missing.gguf"), "data.files": [str(bad)],
                                 "output.dir": str(tmp_path / "run")}, environ={})
    with pytest.raises(MathtuneError, match=r"bad.jsonl:2: output: missing"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_missing_model_is_reported_before_the_run_folder_is_created(tmp_path):
    cfg = load_config(overrides={"model.path": str(tmp_path / "missing.gguf"), "output.dir": str(tmp_path / "run")},
                      environ={})
    with pytest.raises(MathtuneError, match="missing.gguf: no such file or folder"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_run_shorter_than_the_logging_interval_still_reports_its_train_loss(tmp_path, tiny_llama_dir, caplog):
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, max_steps=3, logging_steps=10, save_steps=10)
    cfg.eval.at_end = False
    with caplog.at_level("INFO", logger="mathtune"):
        summary = train(cfg).summary
    assert summary["first_train_loss"] is not None and summary["last_train_loss"] is not None
    assert summary["first_train_loss"] == round(summary["first_train_loss"], 6)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [3]
    line = next(r.getMessage() for r in caplog.records if "Done:" in r.getMessage())
    train_line = next(text for text in line.splitlines() if "train loss" in text)
    # Rounded like the rest: "train loss  1.5555 -> 1.5555", not 1.5555301666259767
    assert train_line.split()[2] == f"{summary['first_train_loss']:.4f}" and "None" not in line


def test_auto_precision_on_a_cpu_with_bf16_units_trains_bf16_products_with_float32_lora(tmp_path, tiny_llama_dir,
                                                                                         monkeypatch):
    """Where the cores have bf16 units, `model.dtype: auto` loads the frozen base in bf16 and trains
    under bf16 autocast, as on CUDA; the LoRA weights (and so the optimizer state and the saved
    adapter) stay float32. This CPU may have no bf16 units: the test says it has, and the products
    are emulated (slow, but a tiny model)."""
    import mathtune.train.recipe as train_module

    monkeypatch.setattr("mathtune.hardware.cpu_bf16_units", lambda: "AMX")
    seen = {}
    build = train_module.build_trainer

    def spy(cfg, model, *args, **kwargs):
        trainer = build(cfg, model, *args, **kwargs)
        seen["base"] = {p.dtype for n, p in model.named_parameters() if "lora_" not in n}
        seen["lora"] = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
        seen["bf16"] = trainer.args.bf16
        return trainer

    monkeypatch.setattr(train_module, "build_trainer", spy)
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, max_steps=4)
    cfg.model.device = "cpu"
    cfg.eval.at_end = False
    summary = train(cfg).summary
    assert seen == {"base": {torch.bfloat16}, "lora": {torch.float32}, "bf16": True}
    assert summary["precision"] == "bf16 autocast, bfloat16 weights"
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert {w.dtype for w in adapter_weights(tmp_path / "run").values()} == {torch.float32}


def test_a_bf16_run_returns_and_scores_the_model_that_eval_chat_and_export_reload(tmp_path, tiny_llama_dir,
                                                                                   monkeypatch):
    """Trainer runs a bf16 model under accelerate's autocast wrapper; the model a run returns (and
    scores at its end) is the saved one, reloaded in bf16 with its float32 adapter: the same logits."""
    from mathtune.run import load_run_config, load_trained

    monkeypatch.setattr("mathtune.hardware.cpu_bf16_units", lambda: "AMX")
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, max_steps=2)
    cfg.eval.at_end = False
    result = train(cfg)
    reloaded, tokenizer = load_trained(tmp_path / "run", load_run_config(tmp_path / "run"))
    probe = tokenizer("What is 12 * 7?", return_tensors="pt")
    with torch.no_grad():
        expected = result.model.eval()(**probe).logits
        assert expected.dtype == torch.bfloat16  # no float32 outputs of an autocast wrapper
        assert torch.equal(reloaded.eval()(**probe).logits, expected)


def test_a_cpu_without_bf16_units_trains_in_float32(tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.setattr("mathtune.hardware.cpu_bf16_units", lambda: None)
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, max_steps=2)
    cfg.model.device = "cpu"
    cfg.eval.at_end = False
    assert train(cfg).summary["precision"] == "float32"
