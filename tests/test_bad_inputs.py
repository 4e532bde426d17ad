"""Every bad input of a `mathtune train` run: the message names the place and the fix, exit status 2,
no traceback, and nothing is written (no run folder; an existing one untouched).

Each case builds its input in a temporary folder and returns the command line; the table is also the
list of what was tried (see the README's "When something is wrong" section).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mathtune.cli import main
from mathtune.config import DataConfig
from mathtune.data.dataset import DataReport, iter_conversations, load_conversations
from mathtune.errors import DataError
from tests.conftest import build_chatml_tokenizer, math_records, save_tiny_model, write_jsonl

GOOD = {"instruction": "What is 2 + 3?", "output": "2 + 3 = 5. \\boxed{5}"}


@dataclass
class Env:
    tmp: Path
    model: Path  # a valid tiny llama folder
    gguf: Path  # the real SmolLM2 GGUF

    @property
    def run(self) -> Path:
        return self.tmp / "run"

    def good_data(self) -> Path:
        return write_jsonl(self.tmp / "good.jsonl", math_records(8))

    def train(self, data: Path | None = None, model: Path | str | None = None, *sets: str) -> list[str]:
        argv = ["train", "--model", str(model or self.model), "--data", str(data or self.good_data()),
                "--output", str(self.run), "--set", f"model.cache_dir={self.tmp / 'cache'}"]
        for item in sets:
            argv += ["--set", item]
        return argv

    def jsonl(self, name: str, records: list) -> Path:
        return write_jsonl(self.tmp / name, records)

    def folder(self, name: str) -> Path:
        (self.tmp / name).mkdir()
        return self.tmp / name

    def fifo(self, name: str) -> Path:
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on Windows")
        os.mkfifo(self.tmp / name)  # opening it would block until a writer comes: never opened
        return self.tmp / name

    def raw(self, name: str, data: bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(data)
        return path


@dataclass
class Case:
    id: str
    argv: Callable[[Env], list[str]]
    expected: list[str]
    """Fragments the message must contain: the place ({tmp} is the case's folder) and the fix."""


def messages(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": text} for role, text in turns]}


def one_broken_line_among_thousands(env: Env) -> list[str]:
    lines = [json.dumps(GOOD)] * 5000
    lines[4320] = '{"instruction": "What is 2 + 3?", "output": "5"'
    return env.train(env.raw("big.jsonl", ("\n".join(lines) + "\n").encode()))


def all_invalid(env: Env) -> list[str]:
    return env.train(env.jsonl("bad.jsonl", [{"instruction": "x", "output": " "}, {"instruction": "y", "output": 3}]),
                     None, "data.on_invalid=skip")


def truncated_gguf(env: Env) -> list[str]:
    with env.gguf.open("rb") as fh:
        head = fh.read(40 << 20)  # the header and the first tensors of 138 MB
    return env.train(None, env.raw("cut.gguf", head))


def unsupported_architecture(env: Env) -> list[str]:
    import numpy as np
    from gguf import GGUFWriter

    path = env.tmp / "rwkv.gguf"
    writer = GGUFWriter(str(path), "rwkv6")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return env.train(None, path)


def no_chat_template(env: Env) -> list[str]:
    tokenizer = build_chatml_tokenizer()
    tokenizer.chat_template = None
    folder = save_tiny_model("llama", env.tmp / "base-model", tokenizer)
    return env.train(None, folder)


def pickle_weights(env: Env) -> list[str]:
    import shutil

    import torch

    folder = env.tmp / "pickled"
    folder.mkdir()
    shutil.copy(env.model / "config.json", folder / "config.json")
    torch.save({"payload": Payload(env.tmp / "pwned")}, folder / "pytorch_model.bin")
    return env.train(None, folder)


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def existing_output(env: Env) -> list[str]:
    env.run.mkdir()
    (env.run / "precious.txt").write_text("results")
    return env.train()


CASES = [
    # --- data ---
    Case("malformed JSON line", lambda e: e.train(e.raw("bad.jsonl", b'{"instruction": "a", "output": "b"}\n'
                                                                       b'{"instruction": "a", "output": }\n')),
         ["{tmp}/bad.jsonl:2:32: invalid JSON: Expecting value"]),
    Case("malformed JSON array", lambda e: e.train(e.raw("bad.json", b'[\n  {"instruction": "a", "output": "b"},\n'
                                                                      b'  {"instruction": "a" "output": "b"}\n]')),
         ["{tmp}/bad.json:3:23: invalid JSON: Expecting ',' delimiter"]),
    Case("one broken line in 5000", one_broken_line_among_thousands,
         ["{tmp}/big.jsonl:4321:", "invalid JSON"]),
    Case("top level is a number", lambda e: e.train(e.raw("n.json", b"42\n")),
         ["{tmp}/n.json: expected a JSON array of records or one JSON object per line"]),
    Case("top level is one object", lambda e: e.train(e.raw("o.json", b'{\n  "data": [1, 2]\n}\n')),
         ["{tmp}/o.json: the file is one JSON object (keys: data); expected an array of records or one record per line"]),
    Case("array of strings", lambda e: e.train(e.raw("s.json", b'["2+2", "4"]')),
         ["{tmp}/s.json [record 0]: cannot tell the record shape", "data.format: fields"]),
    Case("missing field", lambda e: e.train(e.jsonl("m.jsonl", [GOOD, {"instruction": "2+2?"}])),
         ["{tmp}/m.jsonl:2: output: missing (keys present: instruction)", "data.on_invalid: skip"]),
    Case("empty field", lambda e: e.train(e.jsonl("e.jsonl", [GOOD, {"instruction": "2+2?", "output": "  "}])),
         ["{tmp}/e.jsonl:2: output: is empty"]),
    Case("number where text belongs", lambda e: e.train(e.jsonl("t.jsonl", [{"instruction": "2+2?", "output": 4}])),
         ["{tmp}/t.jsonl:1: output: expected text, got a number"]),
    Case("unknown role", lambda e: e.train(e.jsonl("r.jsonl", [messages(("user", "2+2?"), ("bot", "4"))])),
         ["{tmp}/r.jsonl:1: messages[1].role: unknown role 'bot'; expected one of system, user, assistant"]),
    Case("ends on the user", lambda e: e.train(e.jsonl("u.jsonl", [messages(("user", "2+2?"), ("assistant", "4"),
                                                                            ("user", "and 3+3?"))])),
         ["{tmp}/u.jsonl:1: turn 2: the conversation ends on the user; the last turn must be the assistant's"]),
    Case("two assistant turns", lambda e: e.train(e.jsonl("a.jsonl", [messages(("user", "2+2?"), ("assistant", "4"),
                                                                               ("assistant", "four"))])),
         ["{tmp}/a.jsonl:1: turn 2: expected a user turn here: two assistant turns in a row"]),
    Case("non-UTF-8 bytes", lambda e: e.train(e.raw("l.jsonl", b'{"instruction": "2+2?", "output": "4"}\n'
                                                                b'{"instruction": "caf\xe9", "output": "4"}\n')),
         ["{tmp}/l.jsonl:2: not UTF-8 (byte 0xe9); save the file as UTF-8"]),
    Case("10 MB record", lambda e: e.train(e.jsonl("huge.jsonl", [GOOD, {"instruction": "Sum:", "output": "1+" * 5_000_000}])),
         ["{tmp}/huge.jsonl:2: 10,000,004 characters: far more than data.max_seq_length tokens can hold",
          "split the record or raise data.max_seq_length"]),
    Case("empty file", lambda e: e.train(e.raw("empty.jsonl", b"\n  \n")),
         ["{tmp}/empty.jsonl: the file is empty; expected JSON records"]),
    Case("every record invalid", all_invalid,
         ["2 invalid records:", "{tmp}/bad.jsonl:1: output: is empty", "{tmp}/bad.jsonl:2: output: expected text"]),
    Case("field mapping names missing fields",
         lambda e: e.train(e.jsonl("qa.jsonl", [{"question": "2+2?", "answer": "4"}] * 3), None, "data.format=fields",
                           "data.fields={prompt: pregunta, response: respuesta}"),
         ["{tmp}/qa.jsonl: no record has the field 'pregunta' that data.fields.prompt names",
          "the first record's keys: answer, question", "set data.fields.prompt to the name this file uses"]),
    Case("missing data file", lambda e: e.train(e.tmp / "nope.jsonl"), ["{tmp}/nope.jsonl: no such file"]),
    Case("a folder as the data file", lambda e: e.train(e.folder("data.jsonl")),
         ["{tmp}/data.jsonl: is a folder, not a file"]),
    Case("a FIFO as the data file", lambda e: e.train(e.fifo("data.jsonl")),
         ["{tmp}/data.jsonl: is a named pipe (FIFO), not a file"]),
    # --- model ---
    Case("missing model path", lambda e: e.train(None, e.tmp / "nope.gguf"),
         ["{tmp}/nope.gguf: no such file or folder (expected a .gguf file, a Transformers folder or a hub id"]),
    Case("model name matching nothing", lambda e: e.train(None, "qwen-math-7b-no-such-model"),
         ["qwen-math-7b-no-such-model: no such file or folder, and no GGUF model in LM Studio's folders (",
          "`mathtune models` lists"]),
    Case("folder without config.json", lambda e: e.train(None, e.raw("m-Q4_K_M.gguf", b"GGUF").parent),
         ["{tmp}: a folder without config.json is not a Transformers model; it holds GGUF files, name one"]),
    Case("not a GGUF file", lambda e: e.train(None, e.raw("model.gguf", b"PK\x03\x04 a zip")),
         ["{tmp}/model.gguf: not a GGUF file (starts with b'PK\\x03\\x04', expected b'GGUF')"]),
    Case("a FIFO as the model", lambda e: e.train(None, e.fifo("model.gguf")),
         ["{tmp}/model.gguf: is a named pipe (FIFO), not a file; model.path takes a .gguf file"]),
    Case("truncated GGUF", truncated_gguf, ["{tmp}/cut.gguf:", "truncated"]),
    Case("unsupported GGUF architecture", unsupported_architecture,
         ["{tmp}/rwkv.gguf: GGUF architecture 'rwkv6' cannot be loaded by transformers; supported: llama, mistral"]),
    Case("no chat template, no fallback", no_chat_template,
         ["The tokenizer has no chat template", "Set model.chat_template to 'plain'"]),
    Case("pickle weights", pickle_weights,
         ["{tmp}/pickled: the weights are pickle files (pytorch_model.bin)", "safetensors or GGUF"]),
    # --- config ---
    Case("a folder as the config file", lambda e: ["train", "--config", str(e.folder("run.yaml"))],
         ["{tmp}/run.yaml: is a folder, not a file"]),
    Case("unknown key", lambda e: e.train(None, None, "train.lerning_rate=1e-3"),
         ["train.lerning_rate: unknown key (from command line); did you mean 'train.learning_rate'?"]),
    Case("wrong type", lambda e: e.train(None, None, "train.max_steps=many"),
         ["train.max_steps: Input should be a valid integer", "got 'many'"]),
    Case("out of range", lambda e: e.train(None, None, "lora.r=0", "data.eval_fraction=1.5"),
         ["lora.r: Input should be greater than 0", "data.eval_fraction: Input should be less than 1"]),
    Case("contradictory options", lambda e: e.train(None, None, "data.format=fields", "model.device=cpu",
                                                    "model.dtype=bfloat16"),
         ["data.fields: required when data.format is 'fields'", "model.dtype: bfloat16 on this CPU, which has no bf16 units"]),
    Case("output folder exists", existing_output,
         ["{tmp}/run: the run folder exists and is not empty", "--output", "--resume", "--overwrite"]),
]


@pytest.fixture
def env(tmp_path, tiny_llama_dir, smollm_gguf, monkeypatch) -> Env:
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, "error" if name == "TRANSFORMERS_VERBOSITY" else "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr("mathtune.hardware.cpu_bf16_units", lambda: None)  # the same refusals on every CPU
    return Env(tmp_path, tiny_llama_dir, smollm_gguf)


def files_in(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if not {"cache", "hf-datasets"} & set(p.parts))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_named_with_its_fix_and_nothing_is_written(case, env, capsys):
    argv = case.argv(env)
    before = files_in(env.tmp)
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    output = captured.err + captured.out
    assert code == 2, output[-2000:]
    assert "Traceback" not in output
    for fragment in case.expected:
        assert fragment.format(tmp=env.tmp) in output, output[-2000:]
    if case.id == "output folder exists":
        assert (env.run / "precious.txt").read_text() == "results"
        assert sorted(p.name for p in env.run.iterdir()) == ["precious.txt"]
    else:
        assert not env.run.exists()
    assert not (env.tmp / "pwned").exists()
    assert files_in(env.tmp) == before, "nothing but caches may be written"


# ---------------------------------------------------------------------------------------------
# Accepted with a warning or as is


def test_duplicates_are_kept_and_warned_with_their_places(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, {"instruction": "1+1?", "output": "2"}, GOOD, GOOD])
    report = DataReport()
    with caplog.at_level(logging.WARNING, logger="mathtune"):
        ds = load_conversations([path], DataConfig(), report)
    assert len(ds) == 4
    assert report.duplicates == [f"{path}:3 repeats {path}:1", f"{path}:4 repeats {path}:1"]
    assert f"2 duplicate records (kept; remove them if they were not meant to weigh double): {path}:3 repeats" in caplog.text
    assert any("2 duplicate records (kept)" in line for line in report.lines())


def test_a_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\n")
    (place, conv, fmt), = list(iter_conversations(path))
    assert place == f"{path}:1" and fmt == "alpaca" and conv.messages[1]["content"] == GOOD["output"]


def test_a_long_record_that_fits_is_not_refused(tmp_path):
    long = {"instruction": "Add these: " + "1 + " * 10_000 + "1", "output": "10001"}
    path = write_jsonl(tmp_path / "long.jsonl", [long, GOOD])
    assert len(load_conversations([path], DataConfig(max_seq_length=4096), DataReport())) == 2


# ---------------------------------------------------------------------------------------------
# Fuzz: whatever a file holds, reading it raises only our own error type


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10),
              st.sampled_from(["user", "assistant", "system", "human", "gpt", ""])),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(["messages", "role", "content", "from", "value", "conversations",
                                         "instruction", "output", "question", "answer", "prompt", "completion",
                                         "query", "response", "system", "topic", "x"]), children, max_size=5),
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(values=st.lists(json_values, min_size=1, max_size=4), as_array=st.booleans(), fmt=st.sampled_from(
    ["auto", "messages", "sharegpt", "alpaca", "question_answer"]))
def test_any_json_file_yields_records_or_our_errors(tmp_path, values, as_array, fmt):
    path = tmp_path / "fuzz.json"
    text = json.dumps(values) if as_array else "\n".join(json.dumps(v) for v in values)
    path.write_text(text, encoding="utf-8")
    try:
        for place, conv, _ in iter_conversations(path, DataConfig(format=fmt)):
            assert place.startswith(str(path))
    except DataError as exc:
        assert str(path) in str(exc)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=64))
def test_any_bytes_yield_records_or_our_errors(tmp_path, data):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(data)
    try:
        list(iter_conversations(path))
    except DataError as exc:
        assert str(path) in str(exc)


def make_unreadable(path: Path, monkeypatch) -> None:
    """chmod 000; as root (who reads anything) the refusal the kernel would give is injected."""
    path.chmod(0)
    if getattr(os, "geteuid", lambda: 1)() != 0:
        return
    real_open = os.open

    def refusing(file, flags, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)


def test_an_unreadable_file_is_named_as_unreadable_not_missing(tmp_path, monkeypatch):
    from mathtune.config import ModelConfig, load_config
    from mathtune.errors import ConfigError, ModelError
    from mathtune.model.load import resolve_source

    data, config, model = (write_jsonl(tmp_path / "math.jsonl", [GOOD]), tmp_path / "run.yaml", tmp_path / "m.gguf")
    config.write_text("train: {max_steps: 3}\n")
    model.write_bytes(b"GGUF")
    for path in (data, config, model):
        make_unreadable(path, monkeypatch)
    expected = "cannot be read: permission denied (check the file's permissions and owner)"
    with pytest.raises(DataError, match=re.escape(f"{data}: {expected}")):
        list(iter_conversations(data))
    with pytest.raises(ConfigError, match=re.escape(f"{config}: {expected}")):
        load_config(config)
    with pytest.raises(ModelError, match=re.escape(f"{model}: {expected}")):
        resolve_source(ModelConfig(path=str(model)))


def test_data_check_names_folders_and_fifos(tmp_path, capsys):
    (tmp_path / "a.jsonl").mkdir()
    os.mkfifo(tmp_path / "b.jsonl")
    assert main(["data", "check", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path}/a.jsonl: not checked: is a folder, not a file" in out
    assert f"{tmp_path}/b.jsonl: not checked: is a named pipe (FIFO), not a file" in out
