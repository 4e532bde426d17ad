"""Is a model's math answer right? A verdict from HF math-verify, with a little help for our data.

    >>> validate_math_response("6 + 6 = 12.\\nLa respuesta es 12.", "... La respuesta es \\\\boxed{12}.")
    Verdict(correct=True, predicted='12', expected='12', reason='correct')

math-verify does the extraction (`parse`) and the comparison (`verify`): numbers, fractions,
percentages, expressions, equations, sets and intervals are compared as SymPy objects. This module
only decides *which part* of each text is the final answer, and rewrites that part where
math-verify would misread it:

- Reference: the last `\\boxed{}` (or boxes, below), else the text after the last GSM8K `####` or
  announced answer ("The answer is", "La respuesta es", "Respuesta:"), else the whole reference
  when it is, as a whole, a final answer: a number, fraction, percentage, expression, equation,
  set or interval, in plain text or LaTeX ("84", "3/4", "-2,5", "25%", "x = 3", "2\\pi",
  "$\\frac{3}{4}$", "(1, 3]").
  Otherwise (prose such as a concept explanation) it has no checkable answer, and reading its last
  number would grade against an example.
- Response: the last complete `\\boxed{}` (or boxes), else the last announced answer (English or
  Spanish, math-verify only knows the English word "answer"), else the mathematics right after the
  verb of the last sentence ("La derivada es 6x + 2.", "The sum equals 4x + 1.", "f'(x) = 6x + 2";
  math-verify would read 2), else whatever math-verify itself extracts from the end of the response
  (its rightmost number or expression).

Choices where a reading is ambiguous (each rule sits next to its code):

- "25%" equals both 25 and 0.25 (math-verify's rule: a question may ask for the percentage or the
  fraction), never 2.5. "0.25" does not equal 25.
- Several boxes are one list of answers when only commas, semicolons, "and", "or", "y", "o"
  (bare or in `\\text{}`) or `\\quad` lie between them, on one line: "\\boxed{1}, \\boxed{2}" is
  {1, 2}. Anything else between them (a sentence, a line break) makes the earlier box working, and
  the last box is the answer. A list is graded whole: {7, 8} is not 7.
- Thousands: "1,000" and "1.000.000" and "1.234,5" are grouped numbers; a lone "1.000" stays the
  decimal 1.000. In plain text "2,5" is 2.5 but "-2, 3" (comma and space) is a list of answers.
  LaTeX's "14{,}916" and "1{,}000{,}000" are thousands too (three digits after each `{,}`), its
  "2{,}5" the decimal 2.5.
- "(-2, 3)" matches the solution set {-2, 3}: math-verify reads a pair of numbers in parentheses as
  either an open interval or a tuple, and compares the tuple with the set.

Threads and processes: math-verify bounds its work with `signal.alarm`, which only works in the
main thread. There (on POSIX) we pass it the timeout, rounded up to whole seconds as `alarm`
needs; each of its three steps (parse reference, parse response, compare) gets that long. In any
other thread math-verify runs without the alarm in a helper thread, and we wait for it at most
`timeout_seconds`; a helper that overruns is abandoned (Python cannot stop a thread) and
finishes in the background. Everywhere, answers SymPy would choke on (power towers, huge
factorials, thousand-digit numbers, over-long answers) are refused before comparison, so a
verdict does not depend on the thread it came from.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from typing import Literal

logger = logging.getLogger(__name__)

Reason = Literal["correct", "no_answer", "no_reference", "parse_error", "mismatch"]

# An extracted answer longer than this is not a final answer but runaway text; SymPy could take
# minutes on it. When no answer is announced, math-verify reads only the end of the response.
MAX_ANSWER_CHARS = 1000
MAX_FALLBACK_CHARS = 3000


@dataclass(frozen=True)
class Verdict:
    correct: bool
    predicted: str | None
    """The final answer found in the response, as text; None when there is none."""
    expected: str | None
    """The final answer of the reference, as text; None when it has none."""
    reason: Reason
    """correct | no_answer (nothing in the response) | no_reference (nothing checkable in the
    reference) | parse_error (found but unreadable, too large or timed out) | mismatch."""


def validate_math_response(response: str, reference: str, timeout_seconds: float | None = 5.0) -> Verdict:
    """Grade `response` against the final answer of `reference`. Never raises.

    `timeout_seconds` bounds the math-verify work (see the module docstring); None or 0 disables
    the bound. Safe to call from worker threads and worker processes.
    """
    # On Windows math-verify would start a process per step instead of an alarm: use the wait.
    if os.name == "posix" and threading.current_thread() is threading.main_thread():
        alarm = None if not timeout_seconds or timeout_seconds <= 0 else max(1, math.ceil(timeout_seconds))
        return _judge_safely(response, reference, alarm)
    return _judge_with_deadline(response, reference, timeout_seconds)


def reference_answer(reference: str) -> str | None:
    """The final answer of a reference as text (`\\frac{7}{8}`, `1,000`, `84`), or None when it has none."""
    found = _find_reference(reference)
    return found[0] if found else None


def stated_answer(response: str) -> str | None:
    """The final answer a response states (`\\boxed{}` or announced), or None: then the verifier
    falls back to the last expression, which in an answer cut off by the token limit is a
    number from the working, not an answer."""
    found = _find_answer(response)
    return found[0] if found else None


# --- which part of a text is the final answer --------------------------------------------------

# GSM8K calculator annotations: "16 - 3 - 4 = <<16-3-4=9>>9". Their inner "=9" would be read as
# an answer, so they go before anything else looks at the text.
_ANNOTATION = re.compile(r"<<[^<>\n]*>>")

# "The answer is", "Final answer:", "**Answer:**", "La respuesta (final) es", "Respuesta:",
# "Resultado:", "Las soluciones son", GSM8K's "#### 72". The verb or colon is required, so prose such
# as "tiene dos soluciones reales" or "to answer this" is not an announcement, nor is a Markdown
# heading "#### Step 2".
_ANNOUNCE = re.compile(
    r"(?:\b(?:answers?|respuestas?|results?|resultados?|solutions?|soluci[oó]n(?:es)?)"
    r"(?:\s+(?:final|correcta|correct))?(?:[\s*_]+(?:is|are|es|son)\b|[\s*_]*[:=])|####(?=[ \t]*[-+$.\d\\]))"
    r"[\s*_:]*",
    re.IGNORECASE,
)


def _find_answer(text: str) -> tuple[str, str] | None:
    """(answer text, "boxed" | "announced") for the final answer stated in `text`, or None."""
    text = _ANNOTATION.sub("", text)
    boxed = _final_boxes(text)
    if boxed is not None:
        return boxed, "boxed"
    last = None
    for last in _ANNOUNCE.finditer(text):
        pass
    if last is None:
        return None
    # The answer is a display block that follows ("Answer:\n\\[\nx = 3\n\\]"), or else the rest of
    # the line (the next line for "**Answer:**\n12") up to the end of the sentence: a period
    # followed by a space cannot be a decimal point.
    rest = text[last.end():]
    display = re.match(r"\$\$.*?\$\$|\\\[.*?\\\]", rest, re.DOTALL)
    if display:
        answer = display.group()
    else:
        answer = re.split(r"\.\s", rest.split("\n", 1)[0] + " ", maxsplit=1)[0].strip(" \t.*_")
    return (answer, "announced") if answer else None


# A reference that is only its answer: one line (or one display block), short, no prose.
MAX_WHOLE_ANSWER_CHARS = 200
_LATEX_ONLY = re.compile(r"(?:\$\$?[^$]+\$\$?|\\\(.+?\\\)|\\\[.+?\\\])[\s.]*", re.DOTALL)


def _find_reference(text: str) -> tuple[str, str] | None:
    """`_find_answer`, else the whole text when it is nothing but a final answer ("84", "x = 3")."""
    found = _find_answer(text)
    if found is not None:
        return found
    answer = text.strip().rstrip(".").strip()
    if not answer or len(answer) > MAX_WHOLE_ANSWER_CHARS:
        return None
    if _LATEX_ONLY.fullmatch(answer):
        return answer, "latex"
    if "\n" in answer:
        return None
    # Plain text: every part of it must be mathematics once written as LaTeX (a prose word ends the
    # mathematical part, see _math_part), so "12 times 7 is 84" and "Un primo" are not answers.
    latex = _latexify(_normalize_numbers(answer, plain=True))
    math_part = _math_part(latex).strip(" \t,;:*_=")
    return (answer, "whole") if math_part and math_part == latex.strip(" \t,;:*_=") else None


# Between two boxes of one list of answers: separators and spacing, within a line.
_BOX_SPACE = r"(?:[ \t~$]|\\[(),;: !])"
_BOX_JOINER = r"(?:[,;]|\b(?:and|or|y|o)\b|\\(?:text|mathrm|mbox)\{[ \t~]*(?:,|and|or|y|o)[ \t~]*\}|\\q?quad\b)"
_BOX_GAP = re.compile(rf"{_BOX_SPACE}*(?:{_BOX_JOINER}{_BOX_SPACE}*)+", re.IGNORECASE)


def _final_boxes(text: str) -> str | None:
    """Content of the last non-empty `\\boxed{...}` whose braces close (generation may stop
    mid-answer), with the boxes just before it that form one list with it, joined by ", "."""
    opening = {m.end() - 1: m.start() for m in re.finditer(r"\\boxed\s*\{", text)}
    if not opening:
        return None
    # One pass pairing all braces; scanning from each \boxed would be quadratic on garbage.
    stack: list[int] = []
    boxes: list[tuple[int, int, str]] = []  # (start of \boxed, end of its closing brace, content)
    for brace in re.finditer(r"(?<!\\)[{}]", text):
        if brace.group() == "{":
            stack.append(brace.start())
        elif stack:
            start = stack.pop()
            content = text[start + 1 : brace.start()].strip()
            if start in opening and content:
                boxes.append((opening[start], brace.end(), content))
    if not boxes:
        return None
    boxes.sort()
    first = len(boxes) - 1
    while first > 0:
        end_before, start = boxes[first - 1][1], boxes[first][0]
        # Not the box around this one (\boxed{\boxed{5}}), and only separators in between.
        if end_before > start or not _BOX_GAP.fullmatch(text[end_before:start]):
            break
        first -= 1
    return ", ".join(content for _, _, content in boxes[first:])


# A last sentence that states its result after a verb, with no "the answer is": "La derivada es
# 6x + 2.", "Simplificando, queda 2x - 4.", "f'(x) = 6x + 2." ("<=", "\\le" and "==" are not verbs).
_COPULA = re.compile(
    r"\b(?:is(?:\s+equal\s+to)?|equals|are|es(?:\s+igual\s+a)?|son|valen?|quedan?|resultan?|dan?)\b"
    r"|(?<![<>!=\\])=(?!=)",
    re.IGNORECASE,
)


def _final_statement(text: str) -> str | None:
    """What the last sentence of `text` states after its (last) verb, when that starts with mathematics."""
    sentence = re.split(r"\n|;|(?<=[.!?])\s+", text.strip())[-1]
    if re.search(r"(?<!\\)\$.*(?<!\\)\$|\\\(|\\\[|\\boxed", sentence):
        return None  # LaTeX, which math-verify reads itself, or a box cut off before it closed
    for verb in reversed(list(_COPULA.finditer(sentence))):
        stated = sentence[verb.end() :].strip().rstrip(".!?").strip()
        # Mathematics right after the verb ("es 6x + 2, que es lineal"), not prose ("es correcto").
        latex = _latexify(_normalize_numbers(stated, plain=True)).strip()
        math_part = _math_part(latex).strip(" \t,;:*_=")
        if math_part and latex.startswith(math_part):
            return stated
    return None


# --- rewriting an answer so math-verify reads it as meant --------------------------------------


def _normalize_numbers(text: str, plain: bool) -> str:
    """Digit groupings math-verify (or LaTeX) misreads."""

    # Spanish thousands with points: only unambiguous ones, with two or more groups (1.000.000) or
    # a decimal comma (1.234,5). A lone "1.000" stays the decimal 1.000, as math-verify reads it:
    # either reading is a real habit, and a decimal point is what English and LaTeX mean.
    def spanish(m: re.Match) -> str:
        whole, frac = m.group(1), m.group(2)
        if frac is None and whole.count(".") < 2:
            return m.group(0)
        return whole.replace(".", "") + ("." + frac if frac else "")

    text = re.sub(r"(?<![\d.,])(\d{1,3}(?:\.\d{3})+)(?:,(\d+))?(?![\d.])", spanish, text)
    # Thousands grouped with spaces (1 000 000, 1\,000): LaTeX reads "1 000" as the product 1*0.
    text = re.sub(
        r"(?<![\d.,])\d{1,3}(?:(?:\\,|\\ |[ \u00a0\u2009\u202f])\d{3})+(?![\d])",
        lambda m: re.sub(r"\\,|\\ |[ \u00a0\u2009\u202f]", "", m.group(0)),
        text,
    )
    # LaTeX thousands "14{,}916" (math-verify reads them), as in plain text when exactly three
    # digits follow; otherwise a decimal comma "2{,}5" (Spanish typesetting), which math-verify
    # would read as the set {2, 5}.
    text = re.sub(
        r"(?<![\d.,}])\d{1,3}(?:\{,\}\d{3})+(?![\d{])", lambda m: m.group(0).replace("{,}", ""), text
    )
    text = re.sub(r"(\d)\{,\}(\d)", r"\1.\2", text)
    if plain:
        # In plain text a comma between digits is a thousands separator when exactly three digits
        # follow (1,000: math-verify's reading), otherwise a decimal comma (2,5 = 2.5). Items of a
        # list are separated by ", " and inside brackets "(1,3]" the comma separates the ends.
        text = re.sub(
            r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])", lambda m: m.group(0).replace(",", ""), text
        )
        text = re.sub(r"(?<![\d.,(\[{])(-?\d+),(\d+)(?![\d.,)\]}])", r"\1.\2", text)
    return text


# Plain-text answers go to math-verify as LaTeX: outside `$...$` it reads only numbers and digit
# expressions, so "12π" would be 12, "6x^2" 6, "(1, 3]" 3 and "x = 3 or x = -2" just -2.
_UNICODE = {
    "π": r"\pi ", "∞": r"\infty ", "±": r"\pm ", "×": r"\cdot ", "·": r"\cdot ", "÷": "/",
    "−": "-", "≤": r"\le ", "≥": r"\ge ", "²": "^2", "³": "^3", "°": "",
}  # fmt: skip
_LETTERS = "A-Za-zÀ-ÖØ-öø-ÿ"
_WORD = re.compile(rf"(?<![\\{_LETTERS}])[{_LETTERS}]+(?![{_LETTERS}])")
_MATH_WORDS = {"ln", "log", "sin", "cos", "tan", "exp"}
_SPANISH_SHORT_WORDS = {"a", "e", "o", "u", "y"}  # "12 a la semana", "2 y 3": words, not variables


def _plain_to_latex(text: str) -> str:
    """`$...$` around the mathematical part of a plain-text answer; "" when it has none."""
    text = _math_part(_latexify(text)).strip(" \t,;:*_=").rstrip("([{")
    if re.fullmatch(r"\{[^{}]*\}", text):  # a plain "{1, 2}" is a set, not a LaTeX group
        text = rf"\{{{text[1:-1]}\}}"
    return f"${text}$" if text else ""


def _latexify(text: str) -> str:
    """Plain-text mathematics in LaTeX's words: π, √, %, currency, "or" between answers."""
    for char, latex in _UNICODE.items():
        text = text.replace(char, latex)
    text = re.sub(r"(?:√|(?<![\\A-Za-z])sqrt)\s*\(([^()]*)\)", r"\\sqrt{\1}", text)
    text = re.sub(r"(?:√|(?<![\\A-Za-z])sqrt)\s*([\w.]+)", r"\\sqrt{\1}", text)
    text = re.sub(r"(?<![\\A-Za-z])pi(?![A-Za-z])", r"\\pi ", text)
    text = re.sub(r"(?<![\\A-Za-z])(?:infinity|inf)(?![A-Za-z])", r"\\infty ", text)
    text = re.sub(r"(\d)\s*(?:%|\\%|percent\b|por ?ciento\b)", r"\1\\%", text, flags=re.IGNORECASE)
    text = re.sub(r"[$€£¥]", "", text)  # currency: "$18", "18 €"
    text = re.sub(r"\\(?:text|mathrm|mbox)\{([^{}]*)\}", r" \1 ", text)
    # "x = 3 or x = -2", "-2 y 3": a list of answers, which math-verify reads from "a, b".
    return re.sub(r"(?<=[\w})\]])\s+(?:or|and|o|y)\s+(?=[-\w\\(\[{])", ", ", text)


def _math_part(text: str) -> str:
    """From the first mathematical token to the first word of prose: "Janet makes 18 dollars" -> "18"."""
    words = list(_WORD.finditer(text))

    def is_prose(m: re.Match) -> bool:
        word = m.group().lower()
        if word in _MATH_WORDS:
            return False
        if len(word) > 1:
            return True  # units, currency names, sentences; multi-letter variables are rare here
        return word in _SPANISH_SHORT_WORDS and re.match(rf"\s+[{_LETTERS}]{{2}}", text[m.end() :]) is not None

    prose = [m for m in words if is_prose(m)]
    starts = [m.start() for m in words if not is_prose(m)]  # variables: x, C, n
    symbol = re.search(r"[\d\\(\[{]|(?<![A-Za-z])-", text)
    if symbol:
        starts.append(symbol.start())
    if not starts:
        return ""
    begin = min(starts)
    end = next((m.start() for m in prose if m.start() > begin), len(text))
    return text[begin:end]


def _prepare(answer: str, kind: str) -> str:
    """The text handed to math-verify's `parse` for an answer found by `_find_answer` or `_final_statement`."""
    if kind == "latex":
        return _normalize_numbers(answer, plain=False)
    if kind == "boxed":
        # Spanish connectors inside a box: math-verify turns "\text{ or }" into a list, not "o".
        answer = re.sub(r"\\text\{\s*o\s*\}", r"\\text{ or }", answer)
        answer = re.sub(r"\\text\{\s*y\s*\}", r"\\text{ and }", answer)
        return rf"\boxed{{{_normalize_numbers(answer, plain=False)}}}"
    if re.search(r"(?<!\\)\$.*(?<!\\)\$|\\\(|\\\[", answer, re.DOTALL):
        # Already LaTeX. "$x = 3$ o $x = -2$": math-verify joins math separated by "or", "and".
        answer = re.sub(r"(\$|\\\)|\\\])\s+o\s+(?=\$|\\\(|\\\[)", r"\1 or ", answer)
        answer = re.sub(r"(\$|\\\)|\\\])\s+y\s+(?=\$|\\\(|\\\[)", r"\1 and ", answer)
        return _normalize_numbers(answer, plain=False)
    return _plain_to_latex(_normalize_numbers(answer, plain=True))


# --- math-verify ------------------------------------------------------------------------------


def _judge(response: str, reference: str, timeout: int | None) -> Verdict:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException

    # One instance of each: math-verify caches its compiled patterns for a single config only.
    targets = (LatexExtractionConfig(), ExprExtractionConfig())

    def read(text: str) -> list:
        return parse(text, targets, parsing_timeout=timeout, raise_on_error=True)

    ref = _find_reference(reference)
    found = _find_answer(response)
    predicted = found[0] if found else None
    if ref is None:
        return Verdict(False, predicted, None, "no_reference")
    expected = ref[0]

    try:
        gold = read(_prepare(*ref)) if len(expected) <= MAX_ANSWER_CHARS else []
    except (Exception, TimeoutException):
        gold = []
    if not gold or _too_big(gold):
        return Verdict(False, predicted, expected, "parse_error")

    try:
        if found is not None:
            if len(predicted) > MAX_ANSWER_CHARS:
                return Verdict(False, predicted, expected, "parse_error")
            prepared = _prepare(*found)
            if not prepared:  # announced, but no mathematics after it: "The answer is above."
                return Verdict(False, predicted, expected, "no_answer")
            pred = read(prepared)
            if not pred:
                return Verdict(False, predicted, expected, "parse_error")
        else:
            tail = _ANNOTATION.sub("", response)[-MAX_FALLBACK_CHARS:]
            stated = _final_statement(tail)
            try:
                pred = read(_prepare(stated, "stated")) if stated else []
            except (Exception, TimeoutException):
                pred = []
            # Unreadable, or text SymPy could not read ("es \frac{3}{", cut off): math-verify's
            # own reading, as without the statement.
            if pred and not all(isinstance(x, str) for x in pred):
                predicted = stated
            else:
                pred = read(tail)
                if not pred:
                    return Verdict(False, None, expected, "no_answer")
                predicted = str(pred[-1])  # math-verify's own text for what it extracted
    except (Exception, TimeoutException):
        return Verdict(False, predicted, expected, "parse_error")
    if _too_big(pred):
        return Verdict(False, predicted, expected, "parse_error")

    try:
        # allow_set_relation_comp: "1 < x \le 3" answers the interval (1, 3].
        same = verify(gold, pred, allow_set_relation_comp=True, timeout_seconds=timeout, raise_on_error=True)
    except (Exception, TimeoutException):
        return Verdict(False, predicted, expected, "parse_error")
    if same:
        return Verdict(True, predicted, expected, "correct")
    # parse() returns [sympy_value, text], or only the text when SymPy could not read it.
    if all(isinstance(x, str) for x in gold) or all(isinstance(x, str) for x in pred):
        return Verdict(False, predicted, expected, "parse_error")
    return Verdict(False, predicted, expected, "mismatch")


def _judge_safely(response: str, reference: str, timeout: int | None) -> Verdict:
    try:
        return _judge(response, reference, timeout)
    except Exception:
        # _judge already turns math-verify's failures into verdicts; this is for the rest (a
        # response that is not a string): the caller asked for a verdict, not a crash.
        logger.debug("answer verification failed", exc_info=True)
        return Verdict(False, None, None, "parse_error")


def _judge_with_deadline(response: str, reference: str, timeout_seconds: float | None) -> Verdict:
    """`_judge` without math-verify's alarm (not allowed outside the main thread), bounded by a wait."""
    result: list[Verdict] = []
    worker = threading.Thread(
        target=lambda: result.append(_judge_safely(response, reference, None)), name="mathtune-verify", daemon=True
    )
    worker.start()
    worker.join(timeout_seconds if timeout_seconds and timeout_seconds > 0 else None)
    if result:
        return result[0]
    found = _find_answer(response) if isinstance(response, str) else None
    ref = _find_reference(reference) if isinstance(reference, str) else None
    return Verdict(False, found and found[0], ref and ref[0], "parse_error")


def _too_big(parsed: list) -> bool:
    """Would comparing this make SymPy compute an astronomically large number?

    Without the alarm nothing could stop `10^{10^{10}}` (it hangs) or `1000000!` (seconds), so these
    are refused everywhere, keeping verdicts the same in every thread.
    """
    from sympy import Basic, Integer, Pow, factorial, preorder_traversal

    try:
        for value in parsed:
            if not isinstance(value, Basic):
                continue
            for node in preorder_traversal(value):
                if isinstance(node, Integer) and abs(int(node)).bit_length() > 3400:  # > ~1000 digits
                    return True
                if isinstance(node, Pow) and node.exp.is_number and node.base.is_number:
                    # Digits of the result, about; complex() because e^{i\pi} is a fine answer.
                    base, exponent = abs(complex(node.base)), abs(complex(node.exp))
                    if base not in (0.0, 1.0) and not exponent * abs(math.log10(base)) <= 10_000:
                        return True
                if isinstance(node, factorial) and node.args[0].is_number and abs(float(node.args[0])) > 1000:
                    return True
    except Exception:  # too deep to walk, or not a number SymPy can bound
        return True
    return False


class _DropTimeoutDisabledWarning(logging.Filter):
    # Outside the main thread we run math-verify without its alarm on purpose and bound the work
    # ourselves; its warning that "you must provide the logic for timeout interruption yourself"
    # would only confuse a user.
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())
