"""Errors meant for people.

A `MathtuneError` is a user mistake or an environment problem that mathtune can explain: the CLI
prints its message and exits with status 2, without a traceback. Any other exception is a bug in
mathtune and keeps its traceback.
"""

from __future__ import annotations


class MathtuneError(Exception):
    """A problem the user can fix; the message says where it is and what was expected."""


class ConfigError(MathtuneError):
    """The configuration is invalid. `problems` holds one line per offending key."""

    def __init__(self, problems: list[str], source: str = "configuration"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"Invalid {source} ({len(problems)} problem{'s' * (len(problems) != 1)}):\n{lines}")


class DataError(MathtuneError):
    """The dataset is invalid. `problems` holds one line per bad record, with its place."""

    def __init__(self, problems: list[str], total_bad: int | None = None, hint: str = ""):
        self.problems = problems
        total_bad = len(problems) if total_bad is None else total_bad
        lines = "\n".join(f"  - {p}" for p in problems)
        more = f"\n  ... and {total_bad - len(problems)} more" if total_bad > len(problems) else ""
        tail = f"\n{hint}" if hint else ""
        super().__init__(f"{total_bad} invalid record{'s' * (total_bad != 1)}:\n{lines}{more}{tail}")


class ModelError(MathtuneError):
    """The model path, file or tokenizer cannot be used."""
