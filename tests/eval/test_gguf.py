"""`mathtune eval RUN --gguf`: the exported file, scored through llama.cpp with the run's protocol,
against the PyTorch model's answers. On the real SmolLM2-135M run (`smol_run`, tests/conftest.py);
the llama.cpp tests run wherever llama-cpp-python is installed (scripts/llama_cpp.sh)."""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path

import pytest

from mathtune.cli import main
from mathtune.errors import ModelError
from mathtune.eval.gguf import LLAMA_CPP_VERSION, evaluate_gguf, load_llama, read_gguf_header, without_amx_buffers
from mathtune.export import export_run
from tests.conftest import ROOT

CHATS = [
    [{"role": "user", "content": "What is 12 * 7?"}],
    [{"role": "system", "content": "Eres un tutor de matemáticas. Responde con \\boxed{}."},
     {"role": "user", "content": "¿Cuánto es 3/4 + 1/8?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "\\boxed{4}"},
     {"role": "user", "content": "Y el doble de 4, más 1?"}],
]


@pytest.fixture(scope="module")
def f16_file(smol_run) -> Path:
    return export_run(smol_run, "gguf", output=smol_run / "export" / "check-f16.gguf", overwrite=True).path


def test_the_pin_here_is_pyprojects_llama_extra():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["optional-dependencies"]["llama"] == [f"llama-cpp-python=={LLAMA_CPP_VERSION}"]


def test_without_llama_cpp_python_eval_export_check_and_chat_say_how_to_install_it(smol_run, f16_file, capsys,
                                                                                   monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if not installed
    for argv in (["eval", str(smol_run), "--gguf", str(f16_file)], ["eval", str(smol_run), "--gguf"],
                 ["export", str(smol_run), "--to", "gguf", "--output", str(smol_run / "never.gguf"), "--check"],
                 ["chat", "--gguf", str(f16_file)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "needs llama-cpp-python" in err and "bash scripts/llama_cpp.sh" in err and "~/.cache/mathtune/wheels" in err
        assert 'pip install "mathtune[llama]"' in err and f"pip install llama-cpp-python=={LLAMA_CPP_VERSION}" in err
        assert "Visual Studio" in err and "Traceback" not in err
    assert not (smol_run / "never.gguf").exists()  # refused before the export, not after it


def test_amx_weight_buffers_are_left_out_only_while_asked_and_only_on_an_amx_cpu(smollm_gguf, monkeypatch):
    """llama.cpp's AMX buffers crash this llama-cpp-python at the first decode (without_amx_buffers):
    load_llama leaves them out on a CPU with AMX, and only there. On an AMX CPU, the generation below
    is the crash (the whole test process died with a segmentation fault before the fix)."""
    pytest.importorskip("llama_cpp")
    import llama_cpp.llama_cpp as native

    from mathtune.eval import gguf

    with without_amx_buffers(True):
        assert native.llama_model_default_params().use_extra_bufts is False
    with without_amx_buffers(False):
        assert native.llama_model_default_params().use_extra_bufts is True
    assert native.llama_model_default_params().use_extra_bufts is True  # restored

    for units, repack in (("AMX", False), ("AVX512-BF16", True), (None, True)):
        monkeypatch.setattr(gguf, "cpu_bf16_units", lambda units=units: units)
        assert load_llama(smollm_gguf, "a test", n_ctx=64, vocab_only=True).model_params.use_extra_bufts is repack

    monkeypatch.undo()
    llm = load_llama(smollm_gguf, "a test", n_ctx=256)  # the embedded Q4_1 file, whose weights AMX repacks
    ids = llm.tokenize(b"<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n", add_bos=False,
                       special=True)
    answer = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        if token == llm.token_eos() or len(answer) == 32:
            break
        answer.append(token)
    assert "84" in llm.detokenize(answer).decode()


def test_a_file_that_is_not_a_gguf_is_refused_by_name(smol_run, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    text = tmp_path / "notes.gguf"
    text.write_text("just some notes, not a model\n")
    for path, why in ((text, "not a GGUF file"), (tmp_path / "missing.gguf", "no such file"), (tmp_path, "a folder")):
        assert main(["eval", str(smol_run), "--gguf", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"{path}: " in err and why in err and "Traceback" not in err
    with pytest.raises(ModelError, match="not a GGUF file"):
        read_gguf_header(text)
    assert not (smol_run / "eval" / "gguf" / "notes").exists()


def test_the_protocol_is_the_runs_prompt_tokens_stop_tokens_and_greedy(smol_run, f16_file):
    """The GGUF's own template, as llama-cpp-python renders and tokenizes it, gives the run's prompt
    tokens token for token (system prompts, Spanish, earlier turns); the stop tokens are the run's;
    the answers are PyTorch's greedy ones; and create_chat_completion, greedy, answers the same."""
    pytest.importorskip("llama_cpp")
    from mathtune.config import load_config
    from mathtune.data.template import render_chat
    from mathtune.eval.evaluate import generate, stop_token_ids
    from mathtune.eval.gguf import GgufChat
    from mathtune.run import load_trained

    model, tokenizer = load_trained(smol_run, load_config(smol_run / "config.yaml", environ={}))
    model.eval()
    stops = tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer, model))
    chat = GgufChat(f16_file, stops, n_ctx=512)
    assert sorted(chat.stop.values()) == sorted(stops) == ["<|endoftext|>", "<|im_end|>"]
    assert sorted(chat.stop) == stop_token_ids(tokenizer, model)  # the same ids in both vocabularies
    want = generate(model, tokenizer, CHATS, max_new_tokens=24, batch_size=len(CHATS))
    for messages, pytorch in zip(CHATS, want):
        ids = chat.prompt_ids(messages)
        assert ids == tokenizer(render_chat(tokenizer, messages, add_generation_prompt=True),
                                add_special_tokens=False)["input_ids"]
        text, hit_limit, n = chat.answer(ids, 24)
        assert (text, hit_limit) == tuple(pytorch) and 0 < n <= 24
        completion = chat.llm.create_chat_completion(messages, max_tokens=24, temperature=0.0, top_k=1,
                                                     repeat_penalty=1.0, seed=0)
        assert completion["choices"][0]["message"]["content"].strip() == text


def test_the_f16_export_agrees_with_pytorch_and_the_summary_says_so(smol_run, f16_file, caplog):
    pytest.importorskip("llama_cpp")
    caplog.set_level("INFO", logger="mathtune")
    summary = evaluate_gguf(smol_run, f16_file, split="all", limit=6, max_new_tokens=32)
    out = smol_run / "eval" / "gguf" / "check-f16"
    assert json.loads((out / "summary.json").read_text()) == summary
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == summary["examples"] == 6 and summary["pytorch_answers"] == "scored now (float32)"
    assert summary["prompt_tokens"] == {"equal": 6, "checked": 6, "first_difference": None}
    agreement = summary["agreement"]
    assert agreement["checked"] == 6 and agreement["identical"] >= 5, summary["differences"]
    assert agreement["identical"] == sum(r["identical"] for r in rows)
    assert len(summary["differences"]) == 6 - agreement["identical"]
    assert set(summary["models"]) == {"pytorch", "gguf"} and not summary["change"]["significant"]
    for name in ("pytorch", "gguf"):
        m = summary["models"][name]
        assert m["checked"] == 6 and 0 <= m["interval"]["low"] <= m["accuracy"] <= m["interval"]["high"] <= 1
    assert summary["protocol"]["max_new_tokens"] == 32 and summary["protocol"]["stop_tokens"]
    assert "GGUF's own chat template" in summary["protocol"]["prompt"]
    for engine in ("llama_cpp", "pytorch"):
        speed = summary["speed"][engine]
        assert speed["tokens"] > 0 and speed["tokens_per_second"] > 0 and speed["threads"] >= 1
    assert summary["machine"]["cpu"] and summary["llama_cpp_python"] == LLAMA_CPP_VERSION
    log = caplog.text
    assert "GGUF (llama.cpp)" in log and "PyTorch" in log and "Identical answers:" in log and "tokens/s" in log


def test_saved_answers_are_reused_and_an_unchanged_file_is_not_measured_again(smol_run, f16_file, caplog):
    pytest.importorskip("llama_cpp")
    from mathtune.eval.evaluate import evaluate_run

    evaluate_run(smol_run, max_new_tokens=32)  # RUN_DIR/eval/predictions.jsonl: the held-out split's answers
    first = evaluate_gguf(smol_run, f16_file, max_new_tokens=32)
    assert first["pytorch_answers"] == str(smol_run / "eval" / "predictions.jsonl") and first["speed"]["pytorch"] is None
    out = smol_run / "eval" / "gguf" / "check-f16"
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    caplog.set_level("INFO", logger="mathtune")
    assert evaluate_gguf(smol_run, f16_file, max_new_tokens=32) == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written
    assert "measured before, unchanged" in caplog.text
    # Other settings (here a max_new_tokens the saved answers were not given: PyTorch is scored now),
    # or a file rewritten under the same name, are measured again.
    again = evaluate_gguf(smol_run, f16_file, max_new_tokens=24)
    assert again["protocol"]["max_new_tokens"] == 24 and again["pytorch_answers"] == "scored now (float32)"
    os.utime(f16_file)
    assert evaluate_gguf(smol_run, f16_file, max_new_tokens=24)["settings"]["file"]["modified_ns"] == \
        f16_file.stat().st_mtime_ns


def test_an_adapter_gguf_is_scored_on_the_runs_base_gguf(smol_run, smollm_gguf):
    pytest.importorskip("llama_cpp")
    lora = export_run(smol_run, "gguf-lora", output=smol_run / "export" / "check-lora.gguf", overwrite=True).path
    summary = evaluate_gguf(smol_run, lora, split="all", limit=4, max_new_tokens=24)
    assert summary["file"] == str(lora) and summary["lora_on"] == str(smollm_gguf)
    assert summary["prompt_tokens"]["equal"] == 4 and summary["agreement"]["checked"] == 4
    assert (smol_run / "eval" / "gguf" / "check-lora" / "summary.json").is_file()


def test_eval_gguf_without_a_file_exports_first_and_export_check_prints_the_comparison(smol_run, capsys, caplog):
    pytest.importorskip("llama_cpp")
    caplog.set_level("INFO", logger="mathtune")
    default = smol_run / "export" / "SmolLM2-135M-Instruct-f16.gguf"
    default.unlink(missing_ok=True)
    try:
        assert main(["eval", str(smol_run), "--gguf", "--limit", "2", "--max-new-tokens", "16"]) == 0
        out = capsys.readouterr().out
        assert "exporting it first" in out and default.is_file()
    finally:
        # The run is shared with tests/export/test_export.py, whose first export writes this file itself.
        default.unlink(missing_ok=True)
    assert (smol_run / "eval" / "gguf" / default.stem / "summary.json").is_file()

    assert main(["export", str(smol_run), "--to", "gguf", "--output", str(smol_run / "checked.gguf"),
                 "--check"]) == 0
    out = capsys.readouterr().out
    assert f"Written {smol_run / 'checked.gguf'}" in out
    assert "GGUF (llama.cpp)" in caplog.text and "Identical answers:" in caplog.text
    assert "Prompt tokens equal to the run's (render_chat): 2 of 2" in caplog.text
    assert (smol_run / "eval" / "gguf" / "checked" / "summary.json").is_file()
    assert main(["export", str(smol_run), "--to", "hf", "--check"]) == 2
    assert "--to hf writes safetensors" in capsys.readouterr().err
    assert main(["eval", str(smol_run), "--gguf", "--base"]) == 2
    assert main(["eval", str(smol_run), "--rescore"]) == 2


def test_pytorchs_reference_answers_are_given_in_float32_unless_the_base_is_4_bit():
    """A run evaluated in bfloat16 is compared in float32: bf16 rounding alone changed 11 of 40
    greedy answers of the default run, so its answers cannot tell the file's differences from noise."""
    from mathtune.config import load_config
    from mathtune.eval.gguf import reference_dtype

    assert reference_dtype(load_config(overrides={"model.dtype": "bfloat16"}, environ={})) == "float32"
    assert reference_dtype(load_config(overrides={"model.dtype": "float32"}, environ={})) == "float32"
    assert reference_dtype(load_config(overrides={"model.dtype": "bfloat16", "model.load_in_4bit": True},
                                       environ={})) == "bfloat16"
