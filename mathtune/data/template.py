"""Render chat templates, which come from model files, in a sandbox with a time and size budget.

    text = render_chat(tokenizer, messages, add_generation_prompt=False)

A GGUF file or a downloaded tokenizer carries its chat template as Jinja source: code written by
whoever made the file. transformers renders it in Jinja's `ImmutableSandboxedEnvironment`, which
blocks attribute tricks (`''.__class__.__mro__`, `cycler.__init__.__globals__`) but not
runaway work: nested `range` loops spin for hours and `'a' * 10**10` fills memory in one C call
that no timer can interrupt. mathtune renders every template (training, evaluation) here instead:
the same sandbox, filters and globals as transformers, plus

- arithmetic (`*`, `**`, `%`, `+`), calls and filters refuse numbers above MAX_NUMBER, format
  widths of millions, and results longer than MAX_CHARS, before the operation runs;
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
import operator
import re
import signal
import threading
import time
from collections.abc import Sized
from contextlib import contextmanager
from typing import TYPE_CHECKING

from mathtune.errors import MathtuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

RENDER_SECONDS = 2.0
"""Wall-clock budget of one render; real templates need well under a millisecond."""
MAX_NUMBER = 1_000_000
"""Largest number a template may pass to a call or use in `*`, `**` or `%`."""
MAX_CHARS = 10_000_000
"""Largest string or list a template may build, and the longest rendered text (or, for longer
conversations, four times their length)."""


class TemplateError(MathtuneError):
    """The chat template failed, broke out of its budget or tried to leave the sandbox."""


class _OverBudget(Exception):
    pass


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
    except _OverBudget as exc:
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
        return sandbox_class().like_transformers().from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TemplateError(f"The chat template is not valid Jinja (line {exc.lineno}: {exc.message})") from None


@functools.lru_cache(maxsize=1)
def sandbox_class():
    """The BoundedSandbox class (built on first use: jinja2 is imported only to render)."""
    from jinja2.nodes import EvalContext
    from jinja2.runtime import Context
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """Jinja's immutable sandbox with limits on sizes and on time."""

        intercepted_binops = frozenset({"*", "**", "%", "+"})
        code_generator_class = _bounded_code_generator()
        _deadline = float("inf")
        _max_chars = MAX_CHARS

        @classmethod
        def like_transformers(cls):
            """Configured like transformers' chat-template environment: same options, extensions,
            filters and globals (tojson, raise_exception, strftime_now, dict, namespace), minus lipsum."""
            from transformers.utils.chat_template_utils import _compile_jinja_template

            theirs = _compile_jinja_template("").environment
            env = cls(trim_blocks=theirs.trim_blocks, lstrip_blocks=theirs.lstrip_blocks,
                      extensions=[type(ext) for ext in theirs.extensions.values()])
            env.globals.update({k: v for k, v in theirs.globals.items() if k not in ("range", "lipsum")})
            env.globals.pop("lipsum", None)
            env.filters.update(theirs.filters)
            env.filters = {name: env._bounded(name, f) for name, f in env.filters.items()}
            env.finalize = env._measured  # every {{ value }} before it becomes text
            return env

        def concat(self, pieces) -> str:
            """Jinja's `"".join` for the output, `{% set %}` blocks, macro bodies and (through the
            code generator) `~`: the size is counted before the joined string exists."""
            parts, size = [], 0
            for piece in pieces:
                size += len(piece)
                self._check_length(size)
                parts.append(piece)
            self._check_time()
            return "".join(parts)

        def text_of(self, value) -> str:
            """str(value) for `~`, once its size is known to be bounded."""
            return value if isinstance(value, str) else str(self._measured(value))

        def _measured(self, value):
            # str() of a list that holds itself twice, 40 levels deep, is a terabyte written in C
            # (no signal interrupts it): count first, element by element, within the limit.
            if isinstance(value, (list, tuple, dict)):
                self._check_length(_text_size(value, self._max_chars, self._check_time))
            return value

        @contextmanager
        def budget(self, seconds: float, max_chars: int):
            self._deadline, self._max_chars = time.monotonic() + seconds, max_chars
            try:
                with _interval_timer(seconds):
                    yield
            finally:
                self._deadline = float("inf")

        def _check_time(self) -> None:
            if time.monotonic() > self._deadline:
                raise _OverBudget("ran past its time budget")

        def _bounded(self, name: str, func):
            @functools.wraps(func)  # keeps Jinja's pass_context / pass_eval_context markers
            def bounded(*args, **kwargs):
                plain = [a for a in args if not isinstance(a, (Context, EvalContext))]
                self._precheck(name, plain[0] if plain else None, plain[1:], kwargs)
                return self._check_size(func(*args, **kwargs))

            return bounded

        def _precheck(self, name: str, receiver, args, kwargs) -> None:
            """Refuse, before it runs, an operation whose result would be too large to build."""
            self._check_time()
            values = [receiver, *args, *kwargs.values()]
            numbers = [abs(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if numbers and max(numbers) > MAX_NUMBER:
                raise _OverBudget(f"asked for a size of {max(numbers):g} (at most {MAX_NUMBER:,} allowed)")
            for value in values:
                if isinstance(value, str) and _HUGE_FORMAT_WIDTH.search(value):
                    raise _OverBudget("asked for a format width above a million characters")
                if name in _STRINGIFYING:
                    self._measured(value)
            text = receiver if isinstance(receiver, str) else ""
            strings = [v for v in (*args, *kwargs.values()) if isinstance(v, str)]
            width = max(numbers, default=0)
            if name == "replace" and len(strings) >= 2 and strings[0]:
                size = len(text) + text.count(strings[0]) * len(strings[1])
            elif name == "join":
                items = next((v for v in (receiver, *args) if isinstance(v, (list, tuple))), ())
                sep = strings[0] if strings else text
                size = _text_size(items, self._max_chars, self._check_time) + len(sep) * len(items)
            elif name == "indent":
                size = len(text) + text.count("\n") * width
            elif name == "expandtabs":
                size = len(text) + text.count("\t") * (width or 8)
            else:
                return
            self._check_length(size)

        def _check_length(self, size: int) -> None:
            if size > self._max_chars:
                raise _OverBudget(f"would build a value of {size:,} characters (at most {self._max_chars:,} allowed)")

        def _check_size(self, value):
            if isinstance(value, Sized) and not isinstance(value, (dict, range)):
                self._check_length(len(value))
            return value

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
            __self._precheck(getattr(__obj, "__name__", ""), getattr(__obj, "__self__", None), args, kwargs)
            return __self._check_size(super().call(__context, __obj, *args, **kwargs))

        def wrap_str_format(self, value):
            # Jinja wraps `'...'.format` in its sandboxed formatter; look at the format string first.
            receiver = getattr(value, "__self__", None)
            if isinstance(receiver, str) and _HUGE_FORMAT_WIDTH.search(receiver):
                raise _OverBudget("asked for a format width above a million characters")
            return super().wrap_str_format(value)

        def getattr(self, obj, attribute):
            self._check_time()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            self._check_time()
            return super().getitem(obj, argument)

        def call_binop(self, context, operator_name: str, left, right):
            self._check_time()
            numbers = isinstance(left, int) and isinstance(right, int)
            if operator_name == "**" and numbers and max(left.bit_length(), 1) * abs(right) > _MAX_BITS:
                raise _OverBudget(f"computed a number of about {left.bit_length() * abs(right):,} bits")
            if operator_name == "*" and numbers and left.bit_length() + right.bit_length() > _MAX_BITS:
                raise _OverBudget(f"computed a number of about {left.bit_length() + right.bit_length():,} bits")
            if operator_name == "*":
                for seq, times in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                        self._check_length(len(seq) * times)
            if operator_name == "%" and isinstance(left, str):
                self._precheck("%", left, right if isinstance(right, tuple) else (right,), {})
            if operator_name == "+" and isinstance(left, Sized) and isinstance(right, Sized):
                self._check_length(len(left) + len(right))
            return self._check_size(_BINOPS[operator_name](left, right))

    return BoundedSandbox


def _bounded_code_generator():
    from jinja2.compiler import CodeGenerator

    class BoundedCodeGenerator(CodeGenerator):
        """Jinja's code generator, with `a ~ b` joined by the environment's counting `concat`."""

        def visit_Concat(self, node, frame) -> None:
            if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
                return super().visit_Concat(node, frame)  # never with transformers' settings
            self.write("environment.concat(map(environment.text_of, (")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write(")))")
            return None

    return BoundedCodeGenerator


def _text_size(value, limit: int, check_time) -> int:
    """About how many characters str(value) or tojson would write, counting no further than `limit`."""
    size, stack, seen = 0, [value], 0
    while stack and size <= limit:
        item = stack.pop()
        seen += 1
        if seen % 4096 == 0:
            check_time()
        if isinstance(item, str):
            size += len(item) + 2
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
            size += 2 + 2 * len(item)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
            size += 2 + 2 * len(item)
        else:
            size += 8
    return size


# Filters and methods that turn a whole list or dict into text.
_STRINGIFYING = frozenset({"tojson", "string", "pprint", "format", "safe", "escape", "e", "forceescape", "urlize",
                           "wordwrap", "truncate", "indent", "center", "striptags", "title", "capitalize", "upper",
                           "lower", "trim", "replace", "wordcount", "urlencode", "xmlattr", "join"})
_BINOPS = {"*": operator.mul, "**": operator.pow, "%": operator.mod, "+": operator.add}
_MAX_BITS = 1 << 16
# A printf or str.format width/precision of 7+ digits: '%09999999d', '{:>99999999}'.
_HUGE_FORMAT_WIDTH = re.compile(r"(%[-#0 +]*|\{[^{}]*:[^{}]*?)\.?\d{7,}")


@contextmanager
def _interval_timer(seconds: float):
    """Interrupt Python-level work after `seconds` (main thread only: signals go there); restores
    whatever alarm was set before (math-verify uses SIGALRM too)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expired(signum, frame):
        raise _OverBudget("ran past its time budget")

    previous_handler = signal.signal(signal.SIGALRM, expired)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay:
            remaining = max(previous_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, previous_interval)
