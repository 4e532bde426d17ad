"""Render chat templates, which come from model files, in a sandbox with a time and size budget.

    text = render_chat(tokenizer, messages, add_generation_prompt=False)

A GGUF file or a downloaded tokenizer carries its chat template as Jinja source: code written by
whoever made the file. transformers renders it in Jinja's `ImmutableSandboxedEnvironment`, which
blocks attribute tricks (`''.__class__.__mro__`, `cycler.__init__.__globals__`) but not
runaway work: nested `range` loops spin for hours and `'a' * 10**10` fills memory in one C call
that no timer can interrupt. mathtune renders every template (training, evaluation) here instead:
the same sandbox, filters and globals as transformers, plus

- arithmetic (`*`, `**`, `%`, `+`), calls and filters refuse numbers above sandbox.MAX_NUMBER, format
  widths of millions, and results longer than sandbox.MAX_CHARS, before the operation runs;
- every string Jinja itself assembles (`~`, the output, `{% set %}` blocks, macro bodies) is counted
  piece by piece as it is joined, and a list or dict is measured before it is turned into text, so a
  template that doubles a string fails on size after a few megabytes, not on time after gigabytes;
- no `lipsum` (it writes as much text as asked);
- a wall-clock budget per render (RENDER_SECONDS): an interval timer on the main thread interrupts
  Python-level loops, and every call, attribute access and operator checks the deadline too.

A normal template renders in well under a millisecond; the budget costs a few microseconds.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from mathtune.data.sandbox import MAX_CHARS, BoundedSandbox, OverBudget
from mathtune.errors import MathtuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

RENDER_SECONDS = 2.0
"""Wall-clock budget of one render; real templates need well under a millisecond."""


class TemplateError(MathtuneError):
    """The chat template failed, broke out of its budget or tried to leave the sandbox."""


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], add_generation_prompt: bool = False,
                seconds: float | None = None) -> str:
    """`tokenizer.apply_chat_template(messages, tokenize=False, ...)`, rendered within the budget."""
    import jinja2

    template = _compile(tokenizer.get_chat_template())
    env = template.environment
    try:
        limit = max(MAX_CHARS, 4 * sum(len(m.get("content") or "") for m in messages))
        with env.budget(RENDER_SECONDS if seconds is None else seconds, limit):
            text = template.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **tokenizer.special_tokens_map)
    except OverBudget as exc:
        raise TemplateError(f"The chat template {exc}; it was stopped. Templates come from the model file: this one "
                            "looks hostile or broken. Set model.chat_template to 'chatml' or a template you trust.") from None
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateError(f"The chat template tried to leave its sandbox ({exc}) and was stopped. Templates come from "
                            "the model file: set model.chat_template to 'chatml' or a template you trust.") from None
    except (jinja2.exceptions.TemplateError, RecursionError, MemoryError, OverflowError, TypeError, ValueError) as exc:
        raise TemplateError(f"The chat template failed on a conversation of {len(messages)} messages "
                            f"({exc.__class__.__name__}: {exc})") from None
    if len(text) > limit:
        raise TemplateError(f"The chat template wrote {len(text):,} characters for one conversation; it was stopped.")
    return text


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    import jinja2

    try:
        return BoundedSandbox.like_transformers().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TemplateError(f"The chat template is not valid Jinja (line {exc.lineno}: {exc.message})") from None
