"""Errors meant for people.

A `MathtuneError` is a user mistake or an environment problem that mathtune can explain: the CLI
prints its message and exits with status 2, without a traceback. Any other exception is a bug in
mathtune and keeps its traceback.
"""

from __future__ import annotations


class MathtuneError(Exception):
    """A problem the user can fix; the message says where it is and what was expected."""

    exit_code = 2


class ConfigError(MathtuneError):
    """The configuration is invalid. `problems` holds one line per offending key."""

    def __init__(self, problems: list[str], source: str = "configuration"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"Invalid {source} ({len(problems)} problem{'s' * (len(problems) != 1)}):\n{lines}")


class DataError(MathtuneError):
    """The dataset is invalid. `problems` holds one line per problem, each with its place.

    `total_bad` is given for record-level problems: it counts every bad record, while `problems`
    may list only the first few. A file-level problem (missing, empty, not JSON) has none.
    """

    def __init__(self, problems: list[str], total_bad: int | None = None, hint: str = ""):
        self.problems = problems
        self.total_bad = total_bad
        lines = [f"  - {p}" for p in problems]
        if total_bad is not None and total_bad > len(problems):
            lines.append(f"  ... and {total_bad - len(problems)} more")
        if total_bad is None and len(problems) == 1:
            text = problems[0]
        else:
            head = f"{total_bad} invalid record{'s' * (total_bad != 1)}:" if total_bad is not None else "Invalid data:"
            text = "\n".join([head, *lines])
        super().__init__(f"{text}\n{hint}" if hint else text)


class ModelError(MathtuneError):
    """The model path, file or tokenizer cannot be used."""
