"""Config loading: precedence of the four sources, env/--set parsing, and error reports people can act on."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import mathtune.hardware
from mathtune.config import Config, DataConfig, dump_config, load_config, parse_override
from mathtune.errors import ConfigError

NO_ENV: dict[str, str] = {}


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(excinfo) -> str:
    return "\n".join(excinfo.value.problems)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(mathtune.hardware, "cuda_available", lambda: False)


# ---------------------------------------------------------------------------------------------
# Precedence: defaults < YAML < environment < command line


def test_defaults_when_nothing_is_set():
    cfg = load_config(None, None, environ=NO_ENV)
    assert cfg == Config()
    assert cfg.train.learning_rate == 2e-3
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.data.files == []


def test_each_layer_overrides_the_previous(tmp_path):
    key_env = "MATHTUNE_TRAIN__LEARNING_RATE"
    config_file = write_yaml(tmp_path / "run.yaml", "train:\n  learning_rate: 0.001\n  batch_size: 4\n")

    assert load_config(None, None, environ=NO_ENV).train.learning_rate == 2e-3  # defaults
    assert load_config(config_file, None, environ=NO_ENV).train.learning_rate == 0.001  # YAML > defaults
    from_env = load_config(config_file, None, environ={key_env: "0.0025"})
    assert from_env.train.learning_rate == 0.0025  # env > YAML
    from_cli = load_config(config_file, {"train.learning_rate": 0.003}, environ={key_env: "0.0025"})
    assert from_cli.train.learning_rate == 0.003  # command line > env
    # The layers merge key by key: a sibling set only in the YAML survives the later layers.
    assert from_cli.train.batch_size == 4
    assert from_cli.train.max_steps == Config().train.max_steps


def test_environment_is_read_from_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("MATHTUNE_LORA__R", "8")
    assert load_config().lora.r == 8


def test_env_values_are_parsed_as_yaml():
    cfg = load_config(
        None,
        None,
        environ={
            "MATHTUNE_LORA__TARGET_MODULES": "[q_proj, v_proj]",
            "MATHTUNE_LORA__USE_RSLORA": "true",
            "MATHTUNE_TRAIN__GRADIENT_CHECKPOINTING": "yes",
            "MATHTUNE_TRAIN__EVAL_BATCH_SIZE": "null",
            "MATHTUNE_LORA__R": "32",
            "MATHTUNE_DATA__FILES": "a.jsonl",
            "MATHTUNE_CACHE": "/somewhere",  # not a setting: no '__'
            "OTHER__THING": "x",  # not ours: no prefix
        },
    )
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.lora.use_rslora is True
    assert cfg.train.gradient_checkpointing is True
    assert cfg.train.eval_batch_size is None
    assert cfg.lora.r == 32
    assert cfg.data.files == [Path("a.jsonl")]


def test_env_null_replaces_a_yaml_value(tmp_path):
    config_file = write_yaml(tmp_path / "run.yaml", "train:\n  eval_batch_size: 16\n")
    assert load_config(config_file, environ=NO_ENV).train.eval_batch_size == 16
    assert load_config(config_file, environ={"MATHTUNE_TRAIN__EVAL_BATCH_SIZE": "null"}).train.eval_batch_size is None


def test_env_nested_keys_reach_the_field_map():
    cfg = load_config(
        None,
        None,
        environ={
            "MATHTUNE_DATA__FORMAT": "fields",
            "MATHTUNE_DATA__FIELDS__PROMPT": "pregunta",
            "MATHTUNE_DATA__FIELDS__RESPONSE": "respuesta",
        },
    )
    assert cfg.data.fields is not None
    assert (cfg.data.fields.prompt, cfg.data.fields.response) == ("pregunta", "respuesta")


# ---------------------------------------------------------------------------------------------
# Unknown keys


def test_unknown_yaml_key_names_key_file_and_suggestion(tmp_path):
    config_file = write_yaml(tmp_path / "run.yaml", "train:\n  lerning_rate: 0.001\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(config_file, environ=NO_ENV)
    assert len(excinfo.value.problems) == 1
    problem = excinfo.value.problems[0]
    assert problem.startswith("train.lerning_rate:")
    assert "unknown key" in problem
    assert str(config_file) in problem
    assert "did you mean 'train.learning_rate'" in problem
    assert "train.lerning_rate" in str(excinfo.value)


def test_unknown_section(tmp_path):
    config_file = write_yaml(tmp_path / "run.yaml", "trian:\n  learning_rate: 0.001\nzzzz: 1\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(config_file, environ=NO_ENV)
    text = problems_of(excinfo)
    assert "trian: unknown key" in text
    assert "did you mean 'train'" in text
    # Nothing is close to 'zzzz': the valid section names are listed instead.
    zzzz = next(p for p in excinfo.value.problems if p.startswith("zzzz:"))
    assert "valid keys here: model, lora, data, train, grpo, dpo, eval, output" in zzzz


def test_unknown_key_in_field_map_gets_a_suggestion(tmp_path):
    config_file = write_yaml(
        tmp_path / "run.yaml", "data:\n  format: fields\n  fields:\n    prompt: pregunta\n    respone: respuesta\n"
    )
    with pytest.raises(ConfigError) as excinfo:
        load_config(config_file, environ=NO_ENV)
    typo = next(p for p in excinfo.value.problems if p.startswith("data.fields.respone:"))
    assert "did you mean 'data.fields.response'" in typo


def test_unknown_env_key():
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, None, environ={"MATHTUNE_TRAIN__LERNING_RATE": "0.001"})
    (problem,) = excinfo.value.problems
    assert problem.startswith("train.lerning_rate: unknown key")
    assert "(from environment)" in problem
    assert "did you mean 'train.learning_rate'" in problem


def test_unknown_command_line_key():
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {"lora.rank": 8}, environ=NO_ENV)
    (problem,) = excinfo.value.problems
    assert problem.startswith("lora.rank: unknown key (from command line)")


def test_problem_names_the_layer_that_set_the_bad_value(tmp_path):
    config_file = write_yaml(tmp_path / "run.yaml", "train:\n  batch_size: 4\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(config_file, None, environ={"MATHTUNE_TRAIN__BATCH_SIZE": "many"})
    (problem,) = excinfo.value.problems
    assert problem.startswith("train.batch_size:")
    assert "'many'" in problem
    assert "(from environment)" in problem


# ---------------------------------------------------------------------------------------------
# Several problems, values out of range, bad choices


def test_all_problems_are_reported_at_once(tmp_path):
    config_file = write_yaml(
        tmp_path / "run.yaml",
        "train:\n  batch_size: eight\n  lerning_rate: 0.1\ndata:\n  eval_fraction: 1.5\nlora:\n  r: 0\n",
    )
    with pytest.raises(ConfigError) as excinfo:
        load_config(config_file, environ=NO_ENV)
    problems = excinfo.value.problems
    assert len(problems) >= 4
    for key in ("train.batch_size", "train.lerning_rate", "data.eval_fraction", "lora.r"):
        assert any(p.startswith(f"{key}:") for p in problems), (key, problems)
    assert f"({len(problems)} problems)" in str(excinfo.value)


def test_combination_problems_are_reported_with_field_problems(tmp_path):
    config_file = write_yaml(tmp_path / "run.yaml", "data:\n  format: fields\n  eval_fraction: 1.5\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(config_file, environ=NO_ENV)
    text = problems_of(excinfo)
    assert "data.eval_fraction" in text
    assert "data.fields: required" in text


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1])
def test_eval_fraction_must_be_strictly_between_0_and_1(value):
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {"data.eval_fraction": value}, environ=NO_ENV)
    (problem,) = excinfo.value.problems
    assert problem.startswith("data.eval_fraction:")
    assert repr(value) in problem


@pytest.mark.parametrize("value", [0.01, 0.5, 0.99])
def test_eval_fraction_inside_range_is_accepted(value):
    assert load_config(None, {"data.eval_fraction": value}, environ=NO_ENV).data.eval_fraction == value


def test_lora_rank_zero_is_rejected():
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {"lora.r": 0}, environ=NO_ENV)
    (problem,) = excinfo.value.problems
    assert problem.startswith("lora.r:")
    assert "greater than 0" in problem


def test_bad_literal_choice_lists_the_accepted_values():
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {"model.device": "gpu", "train.lr_scheduler": "cosine_restarts"}, environ=NO_ENV)
    device = next(p for p in excinfo.value.problems if p.startswith("model.device:"))
    for choice in ("auto", "cpu", "cuda", "mps"):
        assert f"'{choice}'" in device
    assert "'gpu'" in device
    scheduler = next(p for p in excinfo.value.problems if p.startswith("train.lr_scheduler:"))
    for choice in ("cosine", "linear", "constant", "constant_with_warmup"):
        assert f"'{choice}'" in scheduler


def test_bad_target_modules_is_reported_once_per_key_without_type_noise():
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {"lora.target_modules": "all"}, environ=NO_ENV)
    assert all(p.startswith("lora.target_modules:") for p in excinfo.value.problems)
    assert "all-linear" in problems_of(excinfo)


# ---------------------------------------------------------------------------------------------
# Combinations


def test_4bit_without_cuda_trains_on_the_cpu_and_needs_bitsandbytes(no_cuda, monkeypatch):
    monkeypatch.setattr(mathtune.hardware, "bitsandbytes_available", lambda: True)
    assert load_config(None, {"model.load_in_4bit": True}, environ=NO_ENV).model.load_in_4bit is True
    monkeypatch.setattr(mathtune.hardware, "bitsandbytes_available", lambda: False)
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {"model.load_in_4bit": True}, environ=NO_ENV)
    (problem,) = excinfo.value.problems
    assert problem.startswith("model.load_in_4bit: needs the bitsandbytes package, which is not installed")


def test_4bit_passes_on_this_machine_where_bitsandbytes_is_installed():
    if not mathtune.hardware.bitsandbytes_available():
        pytest.skip("bitsandbytes has no wheel for this platform (Intel macOS)")
    assert load_config(None, {"model.load_in_4bit": True}, environ=NO_ENV).model.load_in_4bit is True


def test_4bit_passes_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(mathtune.hardware, "cuda_available", lambda: True)
    monkeypatch.setattr(mathtune.hardware, "bitsandbytes_available", lambda: True)
    assert load_config(None, {"model.load_in_4bit": True}, environ=NO_ENV).model.load_in_4bit is True
    assert load_config(None, {"model.load_in_4bit": True, "model.device": "cuda"}, environ=NO_ENV).model.device == "cuda"
    assert load_config(None, {"model.load_in_4bit": True, "model.device": "cpu"}, environ=NO_ENV).model.device == "cpu"


def test_4bit_on_mps_fails_even_with_cuda(monkeypatch):
    monkeypatch.setattr(mathtune.hardware, "cuda_available", lambda: True)
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {"model.load_in_4bit": True, "model.device": "mps"}, environ=NO_ENV)
    (problem,) = excinfo.value.problems
    assert problem == ("model.load_in_4bit: bitsandbytes has no 4-bit kernels for MPS; train on the CPU "
                       "(model.device: cpu) or in full precision")


def test_bf16_and_8bit_optimizer_on_cpu_are_reported_together(monkeypatch):
    monkeypatch.setattr("mathtune.hardware.cpu_bf16_units", lambda: None)
    with pytest.raises(ConfigError) as excinfo:
        load_config(
            None, {"model.device": "cpu", "model.dtype": "bfloat16", "train.optimizer": "paged_adamw_8bit"}, environ=NO_ENV
        )
    text = problems_of(excinfo)
    assert len(excinfo.value.problems) == 2
    assert "model.dtype" in text and "train.optimizer" in text


def test_bf16_on_a_cpu_is_refused_without_bf16_units_and_allowed_with_them(monkeypatch):
    monkeypatch.setattr("mathtune.hardware.cpu_bf16_units", lambda: None)
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {"model.device": "cpu", "model.dtype": "bfloat16"}, environ=NO_ENV)
    (problem,) = excinfo.value.problems
    assert problem.startswith("model.dtype: bfloat16 on this CPU, which has no bf16 units (AMX or AVX512-BF16): ")
    assert "24x slower in bf16 than in float32" in problem and problem.endswith("use float32 or auto")
    # Planning for another machine (`mathtune doctor --config`) does not judge this CPU.
    assert load_config(None, {"model.device": "cpu", "model.dtype": "bfloat16"}, environ=NO_ENV,
                       check_machine=False).model.dtype == "bfloat16"

    monkeypatch.setattr("mathtune.hardware.cpu_bf16_units", lambda: "AMX")
    assert load_config(None, {"model.device": "cpu", "model.dtype": "bfloat16"}, environ=NO_ENV).model.dtype == "bfloat16"


def test_fields_format_needs_field_names():
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, {"data.format": "fields"}, environ=NO_ENV)
    (problem,) = excinfo.value.problems
    assert problem.startswith("data.fields: required when data.format is 'fields'")
    ok = load_config(
        None, {"data.format": "fields", "data.fields": {"prompt": "pregunta", "response": "respuesta"}}, environ=NO_ENV
    )
    assert ok.data.fields.prompt == "pregunta"
    assert ok.data.fields.system is None


def test_data_files_accepts_a_single_string(tmp_path):
    config_file = write_yaml(tmp_path / "run.yaml", "data:\n  files: train.jsonl\n  eval_files: [a.jsonl, b.jsonl]\n")
    cfg = load_config(config_file, environ=NO_ENV)
    assert cfg.data.files == [Path("train.jsonl")]
    assert cfg.data.eval_files == [Path("a.jsonl"), Path("b.jsonl")]
    assert DataConfig(files="x.jsonl").files == [Path("x.jsonl")]


# ---------------------------------------------------------------------------------------------
# --set overrides


def test_parse_override_reads_the_value_as_yaml_and_validates_to_float():
    key, value = parse_override("train.learning_rate=1e-4")
    assert key == "train.learning_rate"
    cfg = load_config(None, dict([(key, value)]), environ=NO_ENV)
    assert isinstance(cfg.train.learning_rate, float)
    assert cfg.train.learning_rate == 1e-4


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lora.target_modules=[q_proj, v_proj]", ("lora.target_modules", ["q_proj", "v_proj"])),
        ("lora.use_dora=true", ("lora.use_dora", True)),
        ("model.path=null", ("model.path", None)),
        (" lora.r = 32", ("lora.r", 32)),
        ("data.system_prompt=a=b", ("data.system_prompt", "a=b")),
    ],
)
def test_parse_override_values(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["train.learning_rate", "=1e-4", "  =3", ""])
def test_malformed_override_is_a_config_error(text):
    with pytest.raises(ConfigError) as excinfo:
        parse_override(text)
    (problem,) = excinfo.value.problems
    assert "expected KEY=VALUE" in problem
    assert repr(text) in problem


def test_override_through_a_value_is_an_error():
    with pytest.raises(ConfigError, match="'train' is a value, not a section"):
        load_config(None, {"train": 3, "train.learning_rate": 0.1}, environ=NO_ENV)


# ---------------------------------------------------------------------------------------------
# Round trip


def test_dump_and_reload_is_identity_for_defaults(tmp_path):
    cfg = load_config(None, None, environ=NO_ENV)
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    assert load_config(path, environ=NO_ENV) == cfg


def test_dump_and_reload_is_identity_for_a_custom_config(tmp_path):
    cfg = load_config(
        None,
        {
            "model.path": "/models/Qwen2.5-0.5B-Instruct-Q8_0.gguf",
            "model.cache_dir": str(tmp_path / "cache"),
            "model.chat_template": "chatml",
            "lora.target_modules": ["q_proj", "v_proj"],
            "lora.alpha": 16,
            "data.files": [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
            "data.format": "fields",
            "data.fields": {"prompt": "pregunta", "response": "respuesta", "system": "sistema"},
            "data.system_prompt": "Eres un tutor de matemáticas: responde paso a paso.\n# Sé breve",
            "train.learning_rate": 1e-4,
            "train.max_steps": -1,
            "train.epochs": 2.5,
            "train.eval_batch_size": 4,
            "output.dir": str(tmp_path / "run"),
        },
        environ=NO_ENV,
    )
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    reloaded = load_config(path, environ=NO_ENV)
    assert reloaded == cfg
    assert reloaded.data.system_prompt.endswith("# Sé breve")
    assert yaml.safe_load(path.read_text(encoding="utf-8"))["train"]["learning_rate"] == 1e-4


# ---------------------------------------------------------------------------------------------
# Broken config files


def test_malformed_yaml_reports_line_and_column(tmp_path):
    config_file = write_yaml(tmp_path / "run.yaml", "train:\n  learning_rate: 0.1\n  batch_size: [4\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(config_file, environ=NO_ENV)
    (problem,) = excinfo.value.problems
    assert problem.startswith(f"{config_file}: not valid YAML at line ")
    assert "column" in problem
    config_file = write_yaml(tmp_path / "tab.yaml", "train:\n\tlearning_rate: 0.1\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(config_file, environ=NO_ENV)
    assert "line 2, column 1" in excinfo.value.problems[0]


def test_yaml_with_a_list_at_top_level_is_rejected(tmp_path):
    config_file = write_yaml(tmp_path / "run.yaml", "- train\n- lora\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(config_file, environ=NO_ENV)
    (problem,) = excinfo.value.problems
    assert str(config_file) in problem
    assert "expected a mapping of sections" in problem


def test_empty_yaml_means_defaults(tmp_path):
    config_file = write_yaml(tmp_path / "run.yaml", "# nothing set\n")
    assert load_config(config_file, environ=NO_ENV) == Config()


def test_yaml_with_bom_is_read(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_bytes(b"\xef\xbb\xbftrain:\n  learning_rate: 0.01\n")
    assert load_config(config_file, environ=NO_ENV).train.learning_rate == 0.01


def test_non_utf8_yaml_is_a_config_error(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_bytes(b"data:\n  system_prompt: matem\xe1ticas\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(config_file, environ=NO_ENV)


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as excinfo:
        load_config(missing, environ=NO_ENV)
    (problem,) = excinfo.value.problems
    assert problem == f"{missing}: no such config file"


# ---------------------------------------------------------------------------------------------
# The command line


@pytest.fixture
def quiet_cli_env(monkeypatch):
    # cli._setup_logging setdefaults these; register them so that monkeypatch restores them afterwards.
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, "1" if name != "TRANSFORMERS_VERBOSITY" else "error")


def test_cli_reports_config_problems_and_creates_nothing(tmp_path, capsys, quiet_cli_env):
    from mathtune.cli import main

    run_dir = tmp_path / "runs" / "bad-run"
    config_file = write_yaml(
        tmp_path / "bad.yaml",
        f"output:\n  dir: {run_dir}\ntrain:\n  lerning_rate: 0.001\ndata:\n  eval_fraction: 1.5\n",
    )
    assert main(["train", "--config", str(config_file)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("mathtune: error: Invalid configuration (2 problems)")
    assert "train.lerning_rate: unknown key" in captured.err
    assert "did you mean 'train.learning_rate'" in captured.err
    assert "data.eval_fraction" in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not run_dir.exists()
    assert not run_dir.parent.exists()


def test_cli_malformed_set_returns_2(tmp_path, capsys, quiet_cli_env):
    from mathtune.cli import main

    assert main(["train", "--set", "train.learning_rate", "--output", str(tmp_path / "run")]) == 2
    captured = capsys.readouterr()
    assert "expected KEY=VALUE" in captured.err
    assert "Traceback" not in captured.err
    assert not (tmp_path / "run").exists()


def test_cli_flags_override_the_yaml(tmp_path, capsys, quiet_cli_env, monkeypatch):
    import mathtune.cli
    import mathtune.train.recipe

    seen = {}
    monkeypatch.setattr(mathtune.train.recipe, "train", lambda cfg, resume: seen.update(cfg=cfg, resume=resume))
    config_file = write_yaml(tmp_path / "run.yaml", "train:\n  learning_rate: 0.001\nlora:\n  r: 4\n")
    argv = ["train", "--config", str(config_file), "--set", "train.learning_rate=2e-4", "--data", "x.jsonl",
            "--output", str(tmp_path / "run")]
    assert mathtune.cli.main(argv) == 0
    cfg = seen["cfg"]
    assert cfg.train.learning_rate == 2e-4
    assert cfg.lora.r == 4
    assert cfg.data.files == [Path("x.jsonl")]
    assert cfg.output.dir == tmp_path / "run"
    assert seen["resume"] is False


def test_configs_default_yaml_is_exactly_the_built_in_default():
    from tests.conftest import ROOT

    assert load_config(ROOT / "configs" / "default.yaml", environ={}) == load_config(environ={})


@pytest.mark.parametrize("name", ["default.yaml", "mathstral-7b-qlora.yaml", "transformers-folder.yaml"])
def test_every_example_config_is_valid_and_opens_with_its_command(name, monkeypatch):
    from tests.conftest import ROOT

    monkeypatch.setattr("mathtune.hardware.cuda_available", lambda: True)  # the QLoRA example targets a GPU
    monkeypatch.setattr("mathtune.hardware.bitsandbytes_available", lambda: True)
    path = ROOT / "configs" / name
    assert path.read_text(encoding="utf-8").startswith("# mathtune train --config configs/" + name)
    load_config(path, environ={})
