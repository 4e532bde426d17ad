"""`mathtune chat`: a conversation with the trained run, kept across turns until /reset."""

from __future__ import annotations

import io

import pytest

import mathtune.chat as chat
from mathtune.cli import main
from tests.train.test_recipe import tiny_run_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_llama_dir):
    from mathtune.train.recipe import train

    tmp = tmp_path_factory.mktemp("chat")
    train(tiny_run_config(tmp, tiny_llama_dir, max_steps=2))
    return tmp / "run"


def test_chat_generates_with_the_adapter_and_keeps_the_conversation(tiny_run):
    out = io.StringIO()
    chat.chat_run(tiny_run, max_new_tokens=4, stdin=io.StringIO("What is 2 + 3?\n\nAnd 4 + 4?\n/exit\n"), stdout=out)
    text = out.getvalue()
    assert text.startswith(f"Chatting with {tiny_run} (LoRA on ")
    assert text.count("\n> ") == 4  # a prompt for each line: two questions, the ignored empty line, /exit


def test_history_is_sent_each_turn_and_reset_clears_it(tiny_run, monkeypatch):
    seen = []

    def fake_reply(model, tokenizer, messages, max_new_tokens, stdout):
        seen.append([m["content"] for m in messages])
        return f"answer {len(seen)}"

    monkeypatch.setattr(chat, "_reply_transformers", fake_reply)
    out = io.StringIO()
    chat.chat_run(tiny_run, system="Be brief.", stdin=io.StringIO("one\ntwo\n/reset\nthree\n"), stdout=out)
    assert seen == [["Be brief.", "one"], ["Be brief.", "one", "answer 1", "two"], ["Be brief.", "three"]]
    assert "(conversation cleared)" in out.getvalue()


def test_chat_needs_one_target_and_gguf_needs_llama_cpp(tmp_path, capsys, monkeypatch):
    assert main(["chat"]) == 2
    assert "name a run folder" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # as if not installed
    assert main(["chat", "--gguf", str(tmp_path / "m.gguf")]) == 2
    assert "pip install llama-cpp-python" in capsys.readouterr().err
