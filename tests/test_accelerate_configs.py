"""configs/accelerate/*.yaml: each is read by accelerate's own launcher code into the settings the
processes get, and mathtune recognizes the engine from them."""

from __future__ import annotations

import pytest

from mathtune import distributed
from mathtune.config import load_config
from tests.conftest import ROOT

CONFIGS = ROOT / "configs" / "accelerate"
EXPECTED = {"ddp": "ddp", "fsdp": "fsdp", "deepspeed-zero2": "deepspeed-zero2", "deepspeed-zero3": "deepspeed-zero3"}


def launch_env(name: str) -> tuple[object, dict[str, str]]:
    """What `accelerate launch --config_file configs/accelerate/NAME.yaml -m mathtune train` gives the processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "-m", "mathtune", "train"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        # as accelerate's launch_command does before its DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + ["mixed_precision"] * bool(mixed_precision_from_config)
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        env = prepare_deepspeed_cmd_env(args)
        return args, env[1] if isinstance(env, tuple) else env
    return args, prepare_multi_gpu_env(args)


def test_there_is_one_config_per_engine():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_config_opens_with_its_command_and_launches_its_engine(name, monkeypatch):
    assert (CONFIGS / f"{name}.yaml").read_text().startswith(
        f"# accelerate launch --config_file configs/accelerate/{name}.yaml -m mathtune train --config run.yaml\n")
    args, env = launch_env(name)
    assert args.num_processes == 2 and not args.cpu
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    # Batch size, accumulation and clipping stay mathtune's: DeepSpeed reads them as "auto" from the Trainer.
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env and "ACCELERATE_GRADIENT_CLIPPING" not in env
    for key in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                "FSDP_ACTIVATION_CHECKPOINTING"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_USE_", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "FSDP_")):
            monkeypatch.setenv(key, value)
    assert distributed.engine() == EXPECTED[name]


def test_fsdp_is_version_2_sharded_per_layer_and_saves_a_full_adapter():
    _, env = launch_env("fsdp")
    assert env["FSDP_VERSION"] == "2" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT" and env["FSDP_ACTIVATION_CHECKPOINTING"] == "true"


def test_zero3_gathers_16bit_weights_for_the_adapter_and_zero2_does_not_shard_them():
    _, zero3 = launch_env("deepspeed-zero3")
    assert zero3["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3" and zero3["ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"] == "true"
    assert zero3["ACCELERATE_DEEPSPEED_ZERO3_INIT"] == "false"  # mathtune loads the model before the Trainer exists
    _, zero2 = launch_env("deepspeed-zero2")
    assert zero2["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"


def test_double_activation_checkpointing_under_fsdp_is_refused(monkeypatch):
    _, env = launch_env("fsdp")
    for key in ("ACCELERATE_USE_FSDP", "FSDP_ACTIVATION_CHECKPOINTING"):
        monkeypatch.setenv(key, env[key])
    cfg = load_config(overrides={"model.device": "cuda", "train.gradient_checkpointing": True}, environ={})
    (problem,) = distributed.launch_problems(cfg)
    assert problem.startswith("train.gradient_checkpointing: the accelerate config already checkpoints activations")
    cfg.train.gradient_checkpointing = False
    assert distributed.launch_problems(cfg) == []
