"""Ollama: the merged GGUF and a Modelfile beside it, in one folder.

    mathtune export runs/x --to ollama [--quant f16|bf16|q8_0] [--requant-all]
    ollama create NAME -f runs/x/export/<model>-ollama/Modelfile

The folder holds `<model>-<quant>.gguf` (the `--to gguf` file) and a `Modelfile` that names it
relatively (`FROM ./<model>-<quant>.gguf`, so the folder can be moved), with the run's prompt
format, system prompt and stop tokens, and greedy decoding. The format is Ollama's
(docs/modelfile.md in ollama/ollama, read by its parser/parser.go): one `INSTRUCTION arguments` per
line, instructions in any case, `#` comments, triple quotes around an argument that spans lines.

The prompt format. `ollama create` reads the GGUF's chat template (`tokenizer.chat_template`,
Jinja) and takes the nearest of the templates Ollama ships (template/index.json: the first with a
Levenshtein distance under 100, then its Go template, template/<name>.gotmpl; server/create.go,
detectChatTemplate). Near is not the same: SmolLM2's template is at distance 41 from a ChatML
entry, but Ollama's chatml.gotmpl leaves out the system prompt SmolLM2's template adds to a
conversation that has none, so the model would be asked differently than it was trained. A
TEMPLATE in the Modelfile replaces the detected one (setTemplate in server/create.go). So when the
run's template renders exactly as ChatML, or as mathtune's own `plain` template (which Ollama does
not know), the Modelfile writes that format in Go-template syntax and puts the template's default
system prompt in SYSTEM: Ollama's prompts are then the ones the run trained and was evaluated on.
Any other template is left to Ollama's detection, and the export says so.
"""

from __future__ import annotations

import re
import shutil
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from mathtune import __version__
from mathtune.data.template import TemplateError, render_chat
from mathtune.errors import MathtuneError
from mathtune.eval.evaluate import stop_token_ids
from mathtune.files import is_disk_full, no_space, publish, write_text

MODELFILE = "Modelfile"

# Ollama's own template/chatml.gotmpl. The SYSTEM of the Modelfile reaches it as the first message:
# Ollama puts it before a conversation whose first message is not a system one (server/routes.go).
CHATML_GO = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"

# mathtune's "plain" template (data/tokenize.py BUILTIN_TEMPLATES) in Go-template syntax; EOS is
# replaced by the tokenizer's end-of-sequence token, which ends every answer as in training.
PLAIN_GO = ('{{- range .Messages }}\n{{- if eq .Role "system" }}{{ .Content }}\n\n'
            '{{ else if eq .Role "user" }}### Question:\n{{ .Content }}\n\n'
            "{{ else }}### Answer:\n{{ .Content }}EOS\n\n{{ end }}\n{{- end }}### Answer:\n")


@dataclass
class PromptFormat:
    """A chat format both the run's Jinja template and an Ollama Go template can be checked against."""

    name: str
    turn: Callable[[str, str], str]
    """role, content -> the text of one message"""
    answer: str
    """the text that opens the assistant's answer (the generation prompt)"""
    go_template: str

    def render(self, messages: list[dict[str, str]]) -> str:
        return "".join(self.turn(m["role"], m["content"]) for m in messages) + self.answer

    def system_of(self, text: str) -> str | None:
        """The content of `text` when it is exactly one system message in this format."""
        head, tail = self.turn("system", "\0").split("\0")
        if len(text) > len(head) + len(tail) and text.startswith(head) and text.endswith(tail):
            content = text[len(head): len(text) - len(tail)]
            return content if self.turn("system", content) == text else None
        return None


def prompt_formats(eos: str | None) -> list[PromptFormat]:
    chatml = PromptFormat("ChatML", lambda role, text: f"<|im_start|>{role}\n{text}<|im_end|>\n",
                          "<|im_start|>assistant\n", CHATML_GO)
    if eos is None or not _fits(eos) or "{{" in eos:
        return [chatml]

    def plain(role: str, text: str) -> str:
        return {"system": f"{text}\n\n", "user": f"### Question:\n{text}\n\n"}.get(role, f"### Answer:\n{text}{eos}\n\n")

    return [chatml, PromptFormat("mathtune's plain template", plain, "### Answer:\n", PLAIN_GO.replace("EOS", eos))]


# A conversation with every kind of turn; the answers of a format are compared on it.
PROBE = [{"role": "system", "content": "You check sums."}, {"role": "user", "content": "What is 2 + 2?"},
         {"role": "assistant", "content": "2 + 2 = 4"}, {"role": "user", "content": "¿Y 3 + 3?"}]


def match_format(tokenizer) -> tuple[PromptFormat, str | None] | None:
    """The known format the run's chat template renders exactly, and the system prompt the template
    adds to a conversation without one (SmolLM2's "You are a helpful AI assistant named SmolLM...");
    None when it renders another format, or fails on the probe conversation."""
    try:
        full = render_chat(tokenizer, PROBE, add_generation_prompt=True)
        bare = render_chat(tokenizer, PROBE[1:2], add_generation_prompt=True)
    except TemplateError:
        return None
    for fmt in prompt_formats(tokenizer.eos_token):
        if full != fmt.render(PROBE):
            continue
        expected = fmt.render(PROBE[1:2])
        if bare == expected:
            return fmt, None
        default = fmt.system_of(bare[: len(bare) - len(expected)]) if bare.endswith(expected) else None
        if default:
            return fmt, default
    return None


def stop_tokens(tokenizer, generation_config=None) -> list[str]:
    """The tokens `mathtune eval` stops generating at. `generation_config`: the base's, where it has a
    generation_config.json (evaluation reads the loaded model's; a GGUF base's is its tokenizer's EOS)."""
    ids = stop_token_ids(tokenizer, SimpleNamespace(generation_config=generation_config))
    return tokenizer.convert_ids_to_tokens(ids)


def base_generation_config(folder: Path | None):
    if folder is None or not (Path(folder) / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(folder)


def model_name(run_dir: Path, base: str) -> str:
    """The name suggested for `ollama create`: '<base>-<run folder>', in the letters Ollama's names take."""
    name = re.sub(r"[^a-z0-9_.-]+", "-", f"{base}-{Path(run_dir).resolve().name}".lower()).strip("-.")
    return name[:80] or "mathtune"


def modelfile(gguf_name: str, name: str, tokenizer, system_prompt: str | None, generation_config=None
              ) -> tuple[str, list[str]]:
    """The Modelfile's text, and notes for the user. Raises MathtuneError, before anything is written,
    for a system prompt that a Modelfile cannot carry."""
    matched = match_format(tokenizer)
    fmt, default_system = matched if matched else (None, None)
    system = system_prompt or default_system
    lines = [f"# Written by mathtune {__version__}. Use it with: ollama create {name} -f Modelfile",
             f"FROM ./{gguf_name}", ""]
    notes = []
    if fmt is not None:
        lines += [f"# The prompt format the run trained on ({fmt.name}), in Ollama's template syntax: Ollama would",
                  "# otherwise pick the nearest template it knows for the GGUF's chat template.",
                  f"TEMPLATE {quoted(fmt.go_template, 'the prompt template')}", ""]
    else:
        notes.append("the run's chat template is not ChatML or mathtune's plain one: Ollama picks the prompt format "
                     f"from the GGUF's chat template; check it with `ollama show {name} --template`")
    if system:
        where = "data.system_prompt" if system_prompt else "the chat template's default system prompt"
        lines += [f"# The system prompt training gave a conversation without one ({where});",
                  "# Ollama sends it in the same case.", f"SYSTEM {quoted(system, where)}", ""]
    stops = [t for t in stop_tokens(tokenizer, generation_config) if _fits(t) and '"' not in t]
    lines += ["# Generation ends at the tokens `mathtune eval` stops at.", *(f'PARAMETER stop "{t}"' for t in stops),
              "# Greedy and without a repetition penalty, as `mathtune eval` scored the run (Ollama's defaults are",
              "# temperature 0.8 and repeat_penalty 1.1); raise the temperature for varied answers.",
              "PARAMETER temperature 0", "PARAMETER repeat_penalty 1", ""]
    return "\n".join(lines), notes


def quoted(value: str, what: str) -> str:
    """`value` as a Modelfile argument between triple quotes. Ollama's reader (parser/parser.go) ends
    such an argument at the first line that ends with three quotes and has no escape for them, and
    it drops characters that are not printable: those are refused, with what to do instead."""
    if '"""' in value:
        raise MathtuneError(f'{what} contains three double quotes ("""), which end an argument in an Ollama Modelfile; '
                            "its format has no escape for them. Give the system prompt with each request instead "
                            "(`/set system` in `ollama run`, \"system\" in the API), or use `--to gguf` and write "
                            "the Modelfile yourself.")
    for i, char in enumerate(value):
        if not _fits(char):
            raise MathtuneError(f"{what} has U+{ord(char):04X} ({unicodedata.name(char, 'a control character')}) at "
                                f"character {i + 1}, which Ollama's Modelfile reader drops: the model would get another "
                                "system prompt than in training. Give it with each request instead, or use `--to gguf` "
                                "and write the Modelfile yourself.")
    return f'"""{value}"""'


def _fits(text: str) -> bool:
    # Go's strconv.IsPrint, which the reader keeps, is Python's isprintable; newlines and tabs are kept too.
    return all(c in "\n\t" or c.isprintable() for c in text)


def write_folder(out: Path, gguf_name: str, text: str, write_gguf: Callable[[Path], list[str]]) -> list[str]:
    """`out`/<gguf_name> (written by `write_gguf`) and `out`/Modelfile, staged in `out`.partial and
    renamed when both are complete (an older folder stays whole until then)."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        notes = write_gguf(tmp / gguf_name)
        write_text(tmp / MODELFILE, text)
        publish(tmp, out)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        written = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        raise MathtuneError(no_space(out, written + len(text.encode()), during=True)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return notes
