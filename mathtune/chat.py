"""`mathtune chat`: talk to a trained run (adapter on its base), or to an exported GGUF file.

    mathtune chat runs/x                       # transformers + PEFT, the run's chat template
    mathtune chat --gguf runs/x/export/m.gguf  # llama.cpp, through llama-cpp-python when installed

One line per message; the conversation is kept until /reset; /exit or end of input stops. Answers
are greedy and printed as they are generated.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from mathtune.data.template import render_chat
from mathtune.eval.evaluate import stop_token_ids
from mathtune.eval.gguf import load_llama
from mathtune.run import load_run_config, load_trained

HELP = "Type a message and press Enter. /reset starts over, /exit (or Ctrl-D) quits."


def chat_run(run_dir: Path, max_new_tokens: int = 512, system: str | None = None,
             stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:

    cfg = load_run_config(run_dir)
    model, tokenizer = load_trained(run_dir, cfg)
    model.eval()
    _loop(lambda messages: _reply_transformers(model, tokenizer, messages, max_new_tokens, stdout),
          system or cfg.data.system_prompt, stdin, stdout, f"{run_dir} (LoRA on {cfg.model.path or 'the embedded model'})")


def chat_gguf(path: Path, max_new_tokens: int = 512, system: str | None = None, context: int = 4096,
              stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    llm = load_llama(path, "Chatting with a GGUF file", n_ctx=context)

    def reply(messages: list[dict]) -> str:
        parts = []
        for chunk in llm.create_chat_completion(messages, max_tokens=max_new_tokens, temperature=0.0, stream=True):
            text = chunk["choices"][0]["delta"].get("content") or ""
            stdout.write(text)
            stdout.flush()
            parts.append(text)
        return "".join(parts)

    _loop(reply, system, stdin, stdout, str(path))


def _loop(reply, system: str | None, stdin: TextIO, stdout: TextIO, title: str) -> None:
    stdout.write(f"Chatting with {title}\n{HELP}\n")
    messages = [{"role": "system", "content": system}] if system else []
    start = list(messages)
    while True:
        stdout.write("\n> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            stdout.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages = list(start)
            stdout.write("(conversation cleared)\n")
            continue
        messages.append({"role": "user", "content": text})
        answer = reply(messages)
        stdout.write("\n")
        messages.append({"role": "assistant", "content": answer.strip()})


def _reply_transformers(model, tokenizer, messages: list[dict], max_new_tokens: int, stdout: TextIO) -> str:
    parts = []
    for text in stream_reply(model, tokenizer, messages, max_new_tokens):
        stdout.write(text)
        stdout.flush()
        parts.append(text)
    return "".join(parts)


def stream_reply(model, tokenizer, messages: list[dict], max_new_tokens: int) -> Iterator[str]:
    """The greedy answer to `messages`, in pieces as they are generated (also `mathtune ui`'s chat)."""
    import threading

    import torch
    from transformers import TextIteratorStreamer

    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def generate() -> None:
        try:
            with torch.no_grad():
                model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
                               eos_token_id=stop_token_ids(tokenizer, model), pad_token_id=tokenizer.pad_token_id)
        except BaseException as exc:  # re-raised in the caller's thread, after the streamer is closed
            failure.append(exc)
            streamer.end()

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    yield from (piece for piece in streamer if piece)
    worker.join()
    if failure:
        raise failure[0]
