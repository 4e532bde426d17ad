"""`mathtune export --to ollama`: the folder, and a Modelfile read the way Ollama reads it.

Ollama is not installed here, so the test carries the two parts of it the Modelfile meets: its
Modelfile reader (parser/parser.go, ParseFile: a state machine over the characters, ported below
rune for rune) and, for the TEMPLATE, the few constructs of Go's text/template that the templates
mathtune writes use. With them the prompts Ollama would build are compared with the ones the run
trained on.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from mathtune.cli import main
from mathtune.data.template import render_chat
from mathtune.data.tokenize import BUILTIN_TEMPLATES
from mathtune.errors import MathtuneError
from mathtune.export import ExportResult, export_run, how_to_use
from mathtune.export.ollama import CHATML_GO, match_format, quoted, stop_tokens
from tests.conftest import CHATML, build_chatml_tokenizer
from tests.export.test_export import leftovers, tiny_folder, train_run

# --- Ollama's Modelfile reader (parser/parser.go) ---------------------------------------------------

COMMANDS = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter",
            "message", "requires"}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, argument) pairs as Ollama's ParseFile returns them ('model' for FROM, the parameter's
    name for PARAMETER), or ValueError where it returns an error. An instruction is a word of letters
    in any case, then a space, then its argument up to the end of the line; an argument that starts
    with \"\"\" (or ") runs on, across lines, until a line ends with the closing quotes; a line that
    starts with # is a comment; characters that are not printable are dropped."""
    commands: list[tuple[str, str]] = []
    state, buf, name, role = "nil", "", "", ""
    for r in text:
        nxt, keep = _next_state(r, state)
        if nxt != state:
            if state == "name":
                if buf.lower() not in COMMANDS:
                    raise ValueError(f"invalid command {buf!r}")
                word = buf.lower()
                nxt = word if word in ("parameter", "message") else nxt
                name = "model" if word == "from" else word
            elif state == "parameter":
                name = buf
            elif state == "message":
                if buf not in ("system", "user", "assistant"):
                    raise ValueError(f"invalid message role {buf!r}")
                role = buf
            elif state == "value":
                value, ok = _unquote(buf.strip(" \t\r\n"))
                if not ok or r in " \t":  # a space never ends an argument; an open quote goes on
                    buf += r
                    continue
                commands.append((name, f"{role}: {value}" if role else value))
                role = ""
            buf, state = "", nxt
        if keep is not None and keep.isprintable():
            buf += keep
    if state == "value":
        value, ok = _unquote(buf.strip(" \t\r\n"))
        if not ok:
            raise ValueError(f"unexpected end of file in {buf!r}")
        commands.append((name, f"{role}: {value}" if role else value))
    elif state not in ("nil", "comment"):
        raise ValueError("unexpected end of file")
    if not any(command == "model" for command, _ in commands):
        raise ValueError("no FROM line")
    return commands


def _next_state(r: str, state: str) -> tuple[str, str | None]:
    """parseRuneForState: the next state, and the character to keep (None: none)."""
    space, newline = r in " \t", r in "\r\n"
    alpha = r.isascii() and r.isalpha()
    if state == "nil":
        return ("comment", None) if r == "#" else ("nil", None) if space or newline else ("name", r)
    if state == "name":
        if alpha:
            return "name", r
        if space:
            return "value", None
        raise ValueError(f"invalid command character {r!r}")
    if state == "value":
        return ("nil", r) if space or newline else ("value", r)
    if state in ("parameter", "message"):
        if alpha or (state == "parameter" and (r.isascii() and r.isdigit() or r == "_")):
            return state, r
        if space:
            return "value", None
        raise ValueError("unexpected end of file")
    return ("nil", None) if newline else ("comment", None)


def _unquote(s: str) -> tuple[str, bool]:
    if s.startswith('"""'):
        return (s[3:-3], True) if len(s) >= 6 and s.endswith('"""') else ("", False)
    if s.startswith('"'):
        return (s[1:-1], True) if len(s) >= 2 and s.endswith('"') else ("", False)
    return s, True


def modelfile_of(folder: Path) -> dict[str, list[str]]:
    commands: dict[str, list[str]] = {}
    for command, argument in parse_modelfile((folder / "Modelfile").read_text(encoding="utf-8")):
        commands.setdefault(command, []).append(argument)
    return commands


def test_the_reader_reads_ollamas_documented_examples():
    """The port against docs/modelfile.md's own examples and notes (case-insensitive instructions)."""
    mario = ("FROM llama3.2\n# sets the temperature to 1 [higher is more creative, lower is more coherent]\n"
             "PARAMETER temperature 1\nparameter num_ctx 4096\n\n"
             "SYSTEM You are Mario from super mario bros, acting as an assistant.\n")
    assert parse_modelfile(mario) == [("model", "llama3.2"), ("temperature", "1"), ("num_ctx", "4096"),
                                      ("system", "You are Mario from super mario bros, acting as an assistant.")]
    assert parse_modelfile('FROM ./m.gguf\nTEMPLATE """{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n'
                           '{{ end }}"""\nPARAMETER stop "<|im_end|>"\nMESSAGE user Is Toronto in Canada?\n') == [
        ("model", "./m.gguf"), ("template", "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"),
        ("stop", "<|im_end|>"), ("message", "user: Is Toronto in Canada?")]
    for broken in ("PARAMETER temperature 0\n", "FROM x\nSYSTEM \"\"\"never closed\n", "FROM x\nGREET hi\n"):
        with pytest.raises(ValueError):
            parse_modelfile(broken)


@pytest.mark.parametrize("text", [
    "Eres un tutor de matemáticas. Responde con \\boxed{}.",
    'Two lines,\n"quoted" words and a "final quote"',
    "# a line that looks like a comment\n  indented, with a\ttab  ",
    '"starts with a quote', 'ends with two quotes ""', "ünïcödé: ∫ x² dx = x³/3 + C",
])
def test_quoted_arguments_come_back_whole_from_ollamas_reader(text):
    assert parse_modelfile(f"FROM ./m.gguf\nSYSTEM {quoted(text, 'the prompt')}\n") == [("model", "./m.gguf"),
                                                                                       ("system", text)]


def test_what_a_modelfile_cannot_carry_is_refused_with_the_way_out():
    # Ollama's reader ends the argument at the first line that ends with three quotes:
    with pytest.raises(ValueError, match="invalid command"):
        parse_modelfile('FROM ./m.gguf\nSYSTEM """Answer like this: """\nx = 1"""\n')
    with pytest.raises(MathtuneError, match=r'the prompt contains three double quotes \("""\).*no escape.*--to gguf'):
        quoted('Answer like this: """\nx = 1', "the prompt")
    # ...and drops characters that are not printable (a no-break space pasted from a document):
    assert parse_modelfile('FROM ./m.gguf\nSYSTEM """a\u00a0b"""\n')[1] == ("system", "ab")
    with pytest.raises(MathtuneError, match=r"U\+00A0 \(NO-BREAK SPACE\) at character 2, which Ollama's Modelfile "
                                            "reader drops"):
        quoted("a\u00a0b", "the prompt")


# --- The prompt format: known ones recognised by rendering, written as Go templates ---------------------

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
           "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ZEPHYR = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
             + CHATML)


def tokenizer_with(template: str):
    tokenizer = build_chatml_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


def test_the_prompt_format_is_recognised_by_rendering_the_runs_template():
    fmt, default = match_format(tokenizer_with(CHATML))
    assert (fmt.name, fmt.go_template, default) == ("ChatML", CHATML_GO, None)
    fmt, default = match_format(tokenizer_with(SMOLLM2))
    assert (fmt.name, default) == ("ChatML", "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    fmt, default = match_format(tokenizer_with(BUILTIN_TEMPLATES["plain"]))
    assert fmt.name == "mathtune's plain template" and default is None and "<|im_end|>\n\n{{ end }}" in fmt.go_template
    for other in (ZEPHYR, NO_SYSTEM, BUILTIN_TEMPLATES["chatml"].replace("<|im_end|>\n", "<|im_end|>")):
        assert match_format(tokenizer_with(other)) is None, other


def render_go(template: str, values: dict) -> str:
    """The part of Go's text/template the templates use: text, {{ .Field }}, {{ range .Messages }},
    {{ if eq .Role "x" }} / {{ else if ... }} / {{ else }} / {{ end }}, and the {{- -}} trim markers."""
    pieces = re.split(r"(\{\{.*?\}\})", template, flags=re.DOTALL)
    tokens: list[tuple[str, str]] = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            tokens.append(("text", piece))
            continue
        inner = piece[2:-2]
        if inner.startswith("- "):
            tokens[-1] = ("text", tokens[-1][1].rstrip())
        if inner.endswith(" -"):
            pieces[i + 1] = pieces[i + 1].lstrip()
        tokens.append(("action", inner.strip("- ").strip()))
    out, _ = _run(tokens, 0, values)
    return out


def _run(tokens, i, ctx, stop=("end",)) -> tuple[str, int]:
    out = ""
    while i < len(tokens):
        kind, body = tokens[i]
        if kind == "text":
            out, i = out + body, i + 1
        elif body in stop or body.startswith("else"):
            return out, i
        elif body.startswith("range ."):
            for item in ctx[body.removeprefix("range .")]:  # the tests' conversations are never empty
                text, end = _run(tokens, i + 1, item)
                out += text
            i = end + 1
        elif body.startswith("if "):
            test, taken = body.removeprefix("if "), False
            while True:  # each branch up to the next {{ else ... }} or {{ end }}; the first that holds is taken
                text, i = _run(tokens, i + 1, ctx)
                if not taken and _holds(test, ctx):
                    out, taken = out + text, True
                if tokens[i][1] == "end":
                    break
                test = tokens[i][1].removeprefix("else").removeprefix(" if ").strip()
            i += 1
        else:
            out, i = out + str(ctx[body.removeprefix(".")]), i + 1
    return out, i


def _holds(test: str, ctx: dict) -> bool:
    if not test:  # {{ else }}
        return True
    field, value = re.fullmatch(r'eq \.(\w+) "(.*)"', test).groups()
    return ctx[field] == value


def ollama_prompt(go_template: str, system: str | None, conversation: list[dict]) -> str:
    """The prompt Ollama builds for a chat: the Modelfile's SYSTEM first when the conversation has no
    system message of its own (server/routes.go), every message in .Messages."""
    if system and conversation[0]["role"] != "system":
        conversation = [{"role": "system", "content": system}, *conversation]
    return render_go(go_template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in conversation]})


CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 * 7?"}],
    [{"role": "user", "content": "¿Cuánto es 3/4 + 1/8?"}, {"role": "assistant", "content": "7/8. \\boxed{7/8}"},
     {"role": "user", "content": "¿Y 1/2 + 1/4?"}],
    [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "Derivative of 3x^2?"}],
]


@pytest.mark.parametrize("template", [CHATML, SMOLLM2, BUILTIN_TEMPLATES["plain"]], ids=["chatml", "smollm2", "plain"])
@pytest.mark.parametrize("system_prompt", [None, "Eres un tutor de matemáticas."])
def test_ollama_builds_the_prompts_the_run_trained_on(template, system_prompt):
    tokenizer = tokenizer_with(template)
    fmt, default = match_format(tokenizer)
    for conversation in CONVERSATIONS:
        trained = conversation  # as mathtune builds it: data.system_prompt where a conversation has none
        if system_prompt and conversation[0]["role"] != "system":
            trained = [{"role": "system", "content": system_prompt}, *conversation]
        want = render_chat(tokenizer, trained, add_generation_prompt=True)
        assert ollama_prompt(fmt.go_template, system_prompt or default, conversation) == want


# --- Whole exports ---------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SYSTEM_PROMPT = 'Eres un tutor de matemáticas.\n# Responde con "\\boxed{}".'


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ollama-llama")
    return train_run(root, tiny_folder("llama", root / "base"), **{"data.system_prompt": SYSTEM_PROMPT})


def test_tiny_run_exports_the_gguf_and_a_modelfile_ollama_reads(tiny_run, tmp_path, capsys):
    result = export_run(tiny_run, "ollama")
    assert result.path == tiny_run / "export" / "base-ollama" and result.model_name == "base-run"
    assert sorted(p.name for p in result.path.iterdir()) == ["Modelfile", "base-f16.gguf"]
    assert leftovers(result.path.parent) == ["base-ollama"]  # nothing .partial beside it
    # The GGUF is the --to gguf file, byte for byte.
    assert sha256(result.path / "base-f16.gguf") == sha256(export_run(tiny_run, "gguf", output=tmp_path / "g.gguf").path)

    modelfile = modelfile_of(result.path)
    assert modelfile["model"] == ["./base-f16.gguf"] and (result.path / modelfile["model"][0]).is_file()
    assert modelfile["template"] == [CHATML_GO]
    assert modelfile["system"] == [SYSTEM_PROMPT]
    from transformers import AutoTokenizer

    assert modelfile["stop"] == stop_tokens(AutoTokenizer.from_pretrained(tiny_run / "adapter"))
    assert modelfile["stop"] == ["<|endoftext|>", "<|im_end|>"]
    assert modelfile["temperature"] == ["0"] and modelfile["repeat_penalty"] == ["1"]
    assert set(modelfile) == {"model", "template", "system", "stop", "temperature", "repeat_penalty"}

    # Never replaced without --overwrite; the command line says how to create the model.
    with pytest.raises(MathtuneError, match="already exists; pass --overwrite"):
        export_run(tiny_run, "ollama")
    (result.path / "marker").write_text("the older export")
    assert main(["export", str(tiny_run), "--to", "ollama", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert f"ollama create base-run -f {result.path / 'Modelfile'}" in out and "ollama run base-run" in out
    assert sorted(p.name for p in result.path.iterdir()) == ["Modelfile", "base-f16.gguf"]
    with pytest.raises(MathtuneError, match="is a file; --to ollama writes a folder there"):
        export_run(tiny_run, "ollama", output=tmp_path / "g.gguf", overwrite=True)


def test_a_system_prompt_the_modelfile_cannot_carry_is_refused_before_anything_is_written(tmp_path):
    run = train_run(tmp_path, tiny_folder("llama", tmp_path / "base"), steps=1,
                    **{"data.system_prompt": 'Write answers like """x = 1"""'})
    with pytest.raises(MathtuneError, match=r'data.system_prompt contains three double quotes'):
        export_run(run, "ollama")
    assert not (run / "export").exists() or leftovers(run / "export") == []


def test_how_to_use_names_the_ollama_commands(tmp_path):
    folder = tmp_path / "my runs" / "m-ollama"
    lines = "\n".join(how_to_use(ExportResult(folder, "ollama", 2_500_000, 1.0, "/b.gguf", [], "m-run")))
    assert f'ollama create m-run -f "{folder / "Modelfile"}"' in lines and "ollama run m-run" in lines


# --- The real model: SmolLM2-135M-Instruct, whose template Ollama would match to its chatml without the
# system prompt SmolLM2's template adds.


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory, smollm_gguf, model_cache) -> Path:
    return train_run(tmp_path_factory.mktemp("ollama-smol"), smollm_gguf, model_cache, steps=2)


def test_smollm2_modelfile_prompts_as_training_did(smol_run, tmp_path):
    from transformers import AutoTokenizer

    result = export_run(smol_run, "ollama")
    print((result.path / "Modelfile").read_text(encoding="utf-8"))
    modelfile = modelfile_of(result.path)
    assert modelfile["model"] == ["./SmolLM2-135M-Instruct-f16.gguf"]
    assert sha256(result.path / modelfile["model"][0]) == sha256(export_run(smol_run, "gguf", output=tmp_path / "g.gguf").path)
    assert modelfile["template"] == [CHATML_GO]
    assert modelfile["system"] == ["You are a helpful AI assistant named SmolLM, trained by Hugging Face"]
    assert modelfile["stop"] == ["<|endoftext|>", "<|im_end|>"]
    tokenizer = AutoTokenizer.from_pretrained(smol_run / "adapter")
    for conversation in CONVERSATIONS:
        assert ollama_prompt(modelfile["template"][0], modelfile["system"][0], conversation) == render_chat(
            tokenizer, conversation, add_generation_prompt=True)
