"""The Jinja sandbox chat templates render in: Jinja's immutable sandbox with a time and size budget.

    env = BoundedSandbox.like_transformers()        # as mathtune.data.template does, once per template
    with env.budget(seconds, max_chars):
        text = env.from_string(source).render(...)

What each limit is for is in mathtune/data/template.py, which is the only user; this module imports
jinja2 at the top, so it is itself imported only when a template is rendered.
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

from jinja2.compiler import CodeGenerator
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_NUMBER = 1_000_000
"""Largest number a template may pass to a call or use in `*`, `**` or `%`."""
MAX_CHARS = 10_000_000
"""Largest string or list a template may build, and the longest rendered text (or, for longer
conversations, four times their length)."""


class OverBudget(Exception):
    """A template went past its time or size budget."""


def transformers_environment():
    """The environment transformers renders chat templates in (its options, extensions, filters and
    globals). transformers offers no public way to get it: this is the one private call, guarded by
    tests/test_library_internals.py."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template("").environment


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


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with limits on sizes and on time."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})
    code_generator_class = BoundedCodeGenerator
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
            raise OverBudget("ran past its time budget")

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
            raise OverBudget(f"asked for a size of {max(numbers):g} (at most {MAX_NUMBER:,} allowed)")
        for value in values:
            if isinstance(value, str) and _HUGE_FORMAT_WIDTH.search(value):
                raise OverBudget("asked for a format width above a million characters")
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
            raise OverBudget(f"would build a value of {size:,} characters (at most {self._max_chars:,} allowed)")

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
            raise OverBudget("asked for a format width above a million characters")
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
            raise OverBudget(f"computed a number of about {left.bit_length() * abs(right):,} bits")
        if operator_name == "*" and numbers and left.bit_length() + right.bit_length() > _MAX_BITS:
            raise OverBudget(f"computed a number of about {left.bit_length() + right.bit_length():,} bits")
        if operator_name == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                    self._check_length(len(seq) * times)
        if operator_name == "%" and isinstance(left, str):
            self._precheck("%", left, right if isinstance(right, tuple) else (right,), {})
        if operator_name == "+" and isinstance(left, Sized) and isinstance(right, Sized):
            self._check_length(len(left) + len(right))
        return self._check_size(_BINOPS[operator_name](left, right))


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
        raise OverBudget("ran past its time budget")

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
