"""Answer verification: realistic model outputs against bundled and GSM8K references.

The table holds whole responses (working, then a final answer) as models write them, in English
and Spanish, and references in the two formats mathtune grades against: the bundled dataset's
"La respuesta es \\boxed{...}." and GSM8K's "#### 72" with calculator annotations.
"""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest

import mathtune.verify as verify_module
from mathtune.verify import Verdict, reference_answer, stated_answer, validate_math_response

ROOT = Path(__file__).resolve().parents[1]
GSM8K_TEST = ROOT / "mathtune" / "eval" / "bench" / "gsm8k" / "test.jsonl"  # the sample shipped in the package
PAIRS = ROOT / "mathtune" / "data" / "builtin" / "pairs.jsonl"

# Real GSM8K test answers (lines 1, 147, 490, 612 and 1114 of test.jsonl).
GSM_JANET = (
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
    "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.\n#### 18"
)
GSM_LEGO = (
    "The first set had 500 pieces, and the second set had 3 times as many as the first set, so the second set "
    "has 500*3=<<500*3=1500>>1500 pieces\nThe third set had one-quarter of the 500 pieces, so that means it had "
    "500*.25= <<500*.25=125>>125 pieces\nIn total, that means Johnny picked up 500 + 1500+ 125= "
    "<<500+1500+125=2125>>2125 blocks\n#### 2,125"
)
GSM_TEMP = (
    "-48 + 21 + (-3) = <<-48+21+(-3)=-30>>-30\n-30/3 = <<-30/3=-10>>-10 degrees\nThe average highest "
    "temperature recorded in Southlandia, Northlandia, and Midlandia is -10 degrees Fahrenheit.\n#### -10"
)
GSM_RESEARCH = (
    "Each month of research at the cheaper stage cost 100,000/5=$<<100000/5=20000>>20,000\n"
    "So that research cost 45*30,000=$<<45*30000=1350000>>1,350,000\n"
    "So the total cost was 1,350,000+100,000=$<<1350000+100000=1450000>>1,450,000\n#### 1,450,000"
)
GSM_MORNING = (
    "Start = +<<2=2>>2 degrees\nDrop 8 degrees = 2 - 8 = -6 degrees\nIncrease 3 degrees = -6 + 3 = -3 degrees\n"
    "It was -3 degrees Celsius in the morning.\n#### -3"
)

# In the bundled dataset's style (mathtune/data/builtin/pairs.jsonl).
REF_FRAC = "Denominador común 8: 6/8 + 1/8 = 7/8.\nLa respuesta es \\boxed{\\frac{7}{8}}."
REF_HALF = "Simplify 4/8: divide both by 4.\nThe answer is \\boxed{\\frac{1}{2}}."
REF_THIRD = "Probability = favourable / possible = 2/6 = 1/3.\nThe answer is \\boxed{\\frac{1}{3}}."
REF_QUAD = (
    "Buscamos dos números que sumen 1 y multipliquen -6: 3 y -2.\n"
    "Factorizamos: (x - 3)(x + 2) = 0.\nLa respuesta es \\boxed{-2, 3}."
)
REF_CIRCLE = "Longitud = 2π r = 2π × 6 = 12π.\nLa respuesta es \\boxed{12 \\pi}."
REF_DERIV = "Power rule: (x^n)' = n x^(n-1).\n(2x^3)' = 2 × 3x^2 = 6x^2.\nThe answer is \\boxed{6 x^{2}}."
REF_INTEGRAL = (
    "Regla de la potencia: ∫ x^n dx = x^(n+1)/(n+1) + C.\n∫ 6x^2 dx = 6 × x^3/3 + C = 2x^3 + C.\n"
    "La respuesta es \\boxed{2 x^{3} + C}."
)
REF_LINEAR = "Restamos 8 a ambos lados: 8x = 96.\nDividimos entre 8: x = 12.\nLa respuesta es \\boxed{12}."
REF_X3 = "Subtract 4 from both sides: 2x = 6.\nDivide by 2.\nThe answer is \\boxed{x = 3}."
REF_PCT = "20 out of 80 as a percentage: 20/80 × 100 = 25.\nThe answer is \\boxed{25}."
REF_PCT_SIGN = "La parte coloreada es 1/4 del total, es decir, el 25 %.\nLa respuesta es \\boxed{25\\%}."
REF_TIMES = "11 × 8 = 11 × 10 - 11 × 2 = 110 - 22 = 88.\nThe answer is \\boxed{88}."
REF_INTERVAL = "x - 1 > 0 gives x > 1, and 3 - x ≥ 0 gives x ≤ 3.\nThe answer is \\boxed{(1, 3]}."
REF_SET = "Las raíces de x^2 - 3x + 2 = (x - 1)(x - 2) son 1 y 2.\nLa respuesta es \\boxed{\\{1, 2\\}}."
REF_RECT = "Perímetro = 2 × (5 + 4) = 18.\nLa respuesta es \\boxed{18}."

CONCEPT = (
    "Una fracción a/b representa a partes de un total dividido en b partes iguales. El número de arriba es el "
    "numerador y el de abajo, el denominador, que no puede ser 0. Por ejemplo, 3/4 son tres de cuatro partes."
)

# (response, reference, expected_correct)
CASES = [
    # --- judged correct -------------------------------------------------------------------------
    pytest.param(
        "Janet has 16 - 3 - 4 = 9 eggs left to sell.\nAt $2 each she makes 9 × 2 = 18 dollars.\n"
        "The answer is \\boxed{18}.",
        GSM_JANET, True, id="en-boxed-vs-gsm8k",
    ),
    pytest.param(
        "Le quedan 16 - 3 - 4 = 9 huevos.\nLos vende a 2 $ cada uno: 9 × 2 = 18.\nLa respuesta es $18.",
        GSM_JANET, True, id="es-announced-currency-dollar",
    ),
    pytest.param(
        "Huevos que vende: 16 - 3 - 4 = 9.\nGanancia: 9 × 2 = 18.\nRespuesta: 18 dólares", GSM_JANET, True,
        id="es-respuesta-colon-unit-word",
    ),
    pytest.param(
        "16 - 3 - 4 = 9 eggs remain.\n9 * 2 = 18\n\n**Answer:** $18$", GSM_JANET, True, id="en-markdown-answer",
    ),
    pytest.param(
        "She has 16-3-4=<<16-3-4=9>>9 eggs left.\nShe makes 9*2=$<<9*2=18>>18.\n#### 18", GSM_JANET, True,
        id="gsm8k-style-response-with-annotations",
    ),
    pytest.param(
        "Janet uses 3 + 4 = 7 eggs, so 16 - 7 = 9 are sold.\nSo she makes 9 * 2 = $18 every day.", GSM_JANET, True,
        id="en-no-announcement-last-number",
    ),
    pytest.param(
        "Primero: 16 - 3 - 4 = 9.\nLuego 9 × 2 = 18.\nLa respuesta es 18 € al día.", GSM_JANET, True,
        id="es-euro-sign-and-trailing-words",
    ),
    pytest.param(
        "Second set: 500 × 3 = 1,500. Third set: 500 / 4 = 125.\nTotal: 500 + 1,500 + 125 = 2,125.\n"
        "The answer is 2,125.",
        GSM_LEGO, True, id="en-thousands-comma",
    ),
    pytest.param("500 + 1500 + 125 = 2125\nThe final answer is 2125 blocks.", GSM_LEGO, True, id="en-no-separator"),
    pytest.param(
        "Coste mensual barato: 100.000 / 5 = 20.000 €.\nTotal: 1.350.000 + 100.000 = 1.450.000.\n"
        "La respuesta es 1.450.000 €.",
        GSM_RESEARCH, True, id="es-thousands-points",
    ),
    pytest.param(
        "(-48 + 21 - 3) / 3 = -30 / 3 = -10.\nThe answer is -10 degrees Fahrenheit.", GSM_TEMP, True, id="en-negative",
    ),
    pytest.param(
        "2 - 8 + 3 = -3\nResultado final: -3 grados", GSM_MORNING, True, id="es-resultado-negative-with-unit",
    ),
    pytest.param(
        "3/4 + 1/8 = 6/8 + 1/8 = 7/8.\nEn decimal: 0.875.\nLa respuesta es 0.875", REF_FRAC, True,
        id="es-decimal-vs-frac",
    ),
    pytest.param("Sumamos 6/8 + 1/8.\nLa respuesta es 7/8.", REF_FRAC, True, id="es-slash-fraction"),
    pytest.param("6/8 + 1/8 = 7/8\nRespuesta: $\\frac{7}{8}$", REF_FRAC, True, id="es-latex-inline"),
    pytest.param("4/8 = 0.5\nThe answer is 0.5", REF_HALF, True, id="en-0.5-vs-half"),
    pytest.param("Dividing both by 4 gives 1/2.\nThe answer is 1/2.", REF_HALF, True, id="en-1/2-vs-half"),
    pytest.param("4/8 = 0,5\nLa respuesta es 0,5", REF_HALF, True, id="es-decimal-comma"),
    pytest.param("20/80 = 0.25 = 25%.\nThe answer is 25%.", REF_PCT, True, id="en-25%-vs-25"),
    pytest.param("1/4 = 0.25\nThe answer is 0.25", REF_PCT_SIGN, True, id="en-0.25-vs-25%"),
    pytest.param("Es 1/4 del total.\nLa respuesta es el 25 por ciento.", REF_PCT_SIGN, True, id="es-por-ciento"),
    pytest.param(
        "Derivamos: (2x^3)' = 3 × 2x^2 = 6x^2.\nLa respuesta es 6x^2.", REF_DERIV, True, id="es-plain-expression",
    ),
    pytest.param(
        "∫ 6x^2 dx = 6 · x^3 / 3 + C\nThe answer is \\boxed{2x^3 + C}.", REF_INTEGRAL, True, id="en-boxed-integral",
    ),
    pytest.param("8x + 8 = 104, so 8x = 96.\nThe answer is x = 12.", REF_LINEAR, True, id="en-equation-vs-number"),
    pytest.param("8x = 96\nx = 96/8 = 12\n\\boxed{x = 12}", REF_LINEAR, True, id="boxed-equation-vs-number"),
    pytest.param("2x = 6, so x = 3.\nLa respuesta es 3.", REF_X3, True, id="es-number-vs-equation"),
    pytest.param(
        "x^2 - x - 6 = (x - 3)(x + 2) = 0\nThe answer is x = 3 or x = -2.", REF_QUAD, True, id="en-roots-or",
    ),
    pytest.param(
        "Factorizamos: (x - 3)(x + 2) = 0.\nEntonces x = 3 o x = -2.\nLa respuesta es x = 3 o x = -2.", REF_QUAD, True,
        id="es-roots-o",
    ),
    pytest.param("(x - 3)(x + 2) = 0\nLas soluciones son -2 y 3.", REF_QUAD, True, id="es-soluciones-y"),
    pytest.param("Roots: 3 and -2.\n\\boxed{3, -2}", REF_QUAD, True, id="boxed-roots-reordered"),
    pytest.param("x > 1 and x ≤ 3.\nThe answer is (1, 3].", REF_INTERVAL, True, id="en-interval"),
    pytest.param("Both conditions: 1 < x ≤ 3.\nThe answer is 1 < x ≤ 3.", REF_INTERVAL, True, id="en-inequality"),
    pytest.param("(x - 1)(x - 2) = 0\nLa respuesta es {1, 2}.", REF_SET, True, id="es-set"),
    pytest.param("L = 2π × 6 = 12π\nThe answer is 12π.", REF_CIRCLE, True, id="en-unicode-pi"),
    pytest.param("L = 2 \\pi r = 12\\pi\nLa respuesta es $12\\pi$.", REF_CIRCLE, True, id="es-latex-pi"),
    pytest.param(
        "P = 2(5 + 4) = 18\n\\boxed{18}\nI hope this helps! Ask me if you have 2 more questions.", REF_RECT, True,
        id="boxed-beats-later-numbers",
    ),
    pytest.param(
        "First try: \\boxed{20}. Wait, the sides are 5 and 4, not 5 and 5.\nP = 2 × 9 = 18.\n\\boxed{18}",
        REF_RECT, True,
        id="last-boxed-wins",
    ),
    pytest.param("P = 2 × (5 + 4) = 18\nLa respuesta es 18 cm.", REF_RECT, True, id="es-unit-cm"),
    pytest.param(
        "#### Step 1: eggs left\n16 - 3 - 4 = 9\n\n#### Step 2: money\n9 × 2 = $18 per day.", GSM_JANET, True,
        id="markdown-headings-are-not-gsm8k-markers",
    ),
    pytest.param(
        "8x = 104 - 8 = 96\nTherefore, the answer is:\n\\[\nx = 12.\n\\]", REF_LINEAR, True, id="en-display-block",
    ),
    pytest.param(
        "8x = 96, x = 12.\nFinal Answer: The final answer is $12$. I hope it is correct.", REF_LINEAR, True,
        id="en-minerva-style",
    ),
    # --- judged wrong: near misses ---------------------------------------------------------------
    pytest.param("11 × 8 = 80 + 4 = 84.\nThe answer is 84.", REF_TIMES, False, id="wrong-84-vs-88"),
    pytest.param("2/6 = 1/2\nThe answer is 1/2.", REF_THIRD, False, id="wrong-half-vs-third"),
    pytest.param("1/3 ≈ 0.33\nThe answer is 0.33", REF_THIRD, False, id="wrong-rounded-too-early"),
    pytest.param(
        "Start 2, drop 8: -6, rise 3: 3.\nThe answer is 3 degrees.", GSM_MORNING, False, id="wrong-3-vs-minus-3",
    ),
    pytest.param("20/80 = 0.025\nThe answer is 2.5", REF_PCT_SIGN, False, id="wrong-2.5-vs-25%"),
    pytest.param("2x = -6\nThe answer is x = -3.", REF_X3, False, id="wrong-x=-3-vs-x=3"),
    pytest.param("(x - 3)(x + 2) = 0\nThe answer is x = 3.", REF_QUAD, False, id="wrong-missing-root"),
    pytest.param("Entonces x = 3 o x = 2.\nLa respuesta es x = 3 o x = 2.", REF_QUAD, False, id="wrong-root-sign"),
    pytest.param("L = 2 × 6 = 12\nLa respuesta es 12.", REF_CIRCLE, False, id="wrong-12-vs-12pi"),
    pytest.param("9 × 2 = 19\nThe answer is 19.", GSM_JANET, False, id="wrong-off-by-one"),
    pytest.param("500 + 1500 + 215 = 2215\nThe answer is 2,215.", GSM_LEGO, False, id="wrong-2215-vs-2125"),
    pytest.param("(2x^3)' = 6x^3\nThe answer is 6x^3.", REF_DERIV, False, id="wrong-exponent"),
    pytest.param("∫ 6x^2 dx = 2x^3\nLa respuesta es 2x^3.", REF_INTEGRAL, False, id="wrong-missing-constant"),
    pytest.param("x > 1 and x < 3.\nThe answer is (1, 3).", REF_INTERVAL, False, id="wrong-open-interval"),
    pytest.param("Las raíces son 1 y 3.\nLa respuesta es {1, 3}.", REF_SET, False, id="wrong-set"),
    pytest.param(
        "P = 2 × (5 + 5) = 20\n\\boxed{20}\nHmm, maybe it is 18.", REF_RECT, False, id="wrong-boxed-beats-later-guess",
    ),
]


@pytest.mark.parametrize("response, reference, correct", CASES)
def test_verdict(response, reference, correct):
    verdict = validate_math_response(response, reference)
    assert verdict.correct is correct, verdict
    assert verdict.reason == ("correct" if correct else "mismatch"), verdict
    assert verdict.predicted and verdict.expected


def test_table_covers_enough_right_and_wrong():
    wrong = sum(1 for case in CASES if case.values[2] is False)
    assert len(CASES) >= 40 and wrong >= 12


def test_reasons():
    assert validate_math_response("The answer is \\boxed{\\frac{7}{8}}.", REF_FRAC) == Verdict(
        True, "\\frac{7}{8}", "\\frac{7}{8}", "correct"
    )
    mismatch = validate_math_response("La respuesta es 5/8.", REF_FRAC)
    assert mismatch == Verdict(False, "5/8", "\\frac{7}{8}", "mismatch")
    for nothing in ["", "   \n", "I am not sure how to solve this problem.", "No lo sé, lo siento."]:
        assert validate_math_response(nothing, GSM_JANET) == Verdict(False, None, "18", "no_answer")
    # An announced answer with no mathematics after it is no answer either.
    assert validate_math_response("The answer is above.", GSM_JANET).reason == "no_answer"
    no_ref = validate_math_response("The answer is 3/4.", CONCEPT)
    assert (no_ref.correct, no_ref.expected, no_ref.reason) == (False, None, "no_reference")


WEIRD = [
    "\\boxed{\\frac{",
    "The answer is \\boxed{}",
    "$$$$$$",
    "The answer is $\\frac{1}{$",
    "\\boxed{10^{10^{10}}}",
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{1000000!}",
    "The answer is 2^100000000",
    "\\boxed{" + "9" * 5000 + "}",
    "\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}",
    "The answer is " + "\\frac{1}{" * 400 + "2" + "}" * 400,
    "\\boxed{\\frac{1}{0}}",
    "\x00\x01 🤖 \\\\ }{ ",
    "a" * 200_000,
]


@pytest.mark.parametrize("response", WEIRD)
def test_weird_input_never_raises(response):
    start = time.perf_counter()
    for verdict in (validate_math_response(response, GSM_JANET), validate_math_response(GSM_JANET, response)):
        assert isinstance(verdict, Verdict) and not verdict.correct
        assert verdict.reason in {"no_answer", "no_reference", "parse_error", "mismatch"}
    assert time.perf_counter() - start < 5


def test_huge_and_garbage_answers_are_parse_errors():
    assert validate_math_response("\\boxed{10^{10^{10}}}", GSM_JANET).reason == "parse_error"
    assert validate_math_response("\\boxed{" + "9" * 5000 + "}", GSM_JANET).reason == "parse_error"
    assert validate_math_response("The answer is \\boxed{\\frac{", GSM_JANET).reason == "parse_error"


def test_lone_point_group_is_a_decimal():
    # "1.000" is 1 in English and 1000 in Spanish; only unambiguous point groupings are thousands.
    assert validate_math_response("La respuesta es 1.000.000", "#### 1,000,000").correct
    assert validate_math_response("La respuesta es 1.234,5", "#### 1234.5").correct
    assert not validate_math_response("La respuesta es 1.000", "#### 1,000").correct
    assert validate_math_response("La respuesta es 1.000", "The answer is \\boxed{1}.").correct


def test_reference_answer():
    assert reference_answer(REF_FRAC) == "\\frac{7}{8}"
    assert reference_answer(REF_INTEGRAL) == "2 x^{3} + C"
    assert reference_answer(GSM_JANET) == "18"
    assert reference_answer(GSM_RESEARCH) == "1,450,000"
    assert reference_answer(CONCEPT) is None
    assert reference_answer("") is None


def _gsm8k_answers(limit: int) -> list[str]:
    with GSM8K_TEST.open(encoding="utf-8") as f:
        return [json.loads(line)["answer"] for line, _ in zip(f, range(limit))]


def test_gsm8k_answers_verify_against_themselves_and_reject_n_plus_1():
    for i, answer in enumerate(_gsm8k_answers(300)):
        n = int(answer.rsplit("####", 1)[1].strip().replace(",", ""))
        assert validate_math_response(answer, answer).correct, (i, answer)
        wrong = validate_math_response(f"The answer is {n + 1}", answer)
        assert (wrong.correct, wrong.reason) == (False, "mismatch"), (i, wrong)


# References that are only their final answer (a `completion` or `answer` field): checkable.
WHOLE_ANSWERS = [
    ("84", "12 times 7 is 84.", "12 * 7 = 88"), ("17", "La respuesta es 17.", "Es 71."),
    ("3/4", "The answer is 0.75", "The answer is 3/8"), ("-2.5", "Answer: -5/2", "Answer: 2.5"),
    ("-2,5", "La respuesta es -2,5", "La respuesta es -25"), ("x = 3", "So x = 3.", "So x = -3."),
    ("2\\pi", "The answer is 2π", "The answer is 2"), ("25%", "The answer is 25%", "The answer is 2.5"),
    ("1,000", "The answer is 1000", "The answer is 1"), ("1.234,5", "La respuesta es 1234.5", "La respuesta es 1.2345"),
    ("$\\frac{3}{4}$", "\\boxed{\\frac{3}{4}}", "\\boxed{\\frac{4}{3}}"), ("\\frac{3}{4}", "Respuesta: 3/4", "Respuesta: 4/3"),
    ("\\(x^2 + 1\\)", "The answer is $x^2 + 1$", "The answer is $x^2 - 1$"),
    ("(1, 3]", "The answer is (1, 3]", "The answer is [1, 3]"), ("{1, 2}", "\\boxed{\\{1, 2\\}}", "\\boxed{\\{1, 3\\}}"),
    ("x = 3 or x = -2", "The solutions are x = -2 and x = 3", "The solutions are x = 2 and x = 3"),
    ("-2 y 3", "Las soluciones son -2 y 3", "Las soluciones son 2 y 3"), ("$18", "So she makes $18.", "So she makes $16."),
    ("6x^2", "The answer is 6x^2", "The answer is 6x"), ("sqrt(2)", "The answer is √2", "The answer is 2"),
    ("x ≤ 3", "The answer is x \\le 3", "The answer is x < 3"), ("84.", "\\boxed{84}", "\\boxed{48}"),
    ("50 por ciento", "La respuesta es 50%", "La respuesta es 5%"), ("2 x^{3} + C", "\\boxed{2x^3 + C}", "\\boxed{6x^2}"),
]
PROSE = [
    CONCEPT, "The slope of the tangent line.", "Un número con dos divisores.", "12 times 7 is 84.", "Yes", "It depends",
    "Los números primos son 2, 3, 5 y 7.", "Because 2 + 2 = 4", "x = 3\nx = -2 too", "84 apples", "", "   ",
    "A prime number has exactly two divisors: 1 and itself.", "7" * 250,
]


@pytest.mark.parametrize(("reference", "right", "wrong"), WHOLE_ANSWERS, ids=[case[0] for case in WHOLE_ANSWERS])
def test_a_reference_that_is_only_its_answer_is_checkable(reference, right, wrong):
    assert reference_answer(reference) == reference.strip().rstrip(".")
    assert validate_math_response(right, reference).correct, validate_math_response(right, reference)
    verdict = validate_math_response(wrong, reference)
    assert (verdict.correct, verdict.reason) == (False, "mismatch"), verdict


@pytest.mark.parametrize("reference", PROSE)
def test_prose_without_an_announced_answer_is_not_checkable(reference):
    assert reference_answer(reference) is None
    assert validate_math_response("The answer is 84.", reference).reason == "no_reference"


def test_a_stated_answer_is_boxed_or_announced_never_the_last_number_of_the_working():
    assert stated_answer("So 3 + 4 = 7.\nThe answer is 7.") == "7"
    assert stated_answer("\\boxed{12}") == "12"
    assert stated_answer("First 16 - 3 = 13, then 13 - 4") is None
    assert stated_answer("84") is None  # only a reference may be nothing but its answer


def test_bundled_outputs_verify_against_themselves():
    records = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines() if line.strip()]
    boxed = [r["output"] for r in records if "\\boxed" in r["output"]]
    assert len(boxed) > 400
    failures = [(o, v) for o in boxed if not (v := validate_math_response(o, o)).correct]
    assert not failures, failures[:3]
    # Graded against the next record with a different answer, none is correct.
    answers = [reference_answer(o).replace(" ", "") for o in boxed]
    others = [(o, boxed[i - 1]) for i, o in enumerate(boxed) if answers[i] != answers[i - 1]]
    assert len(others) > 300
    assert not [(o, ref) for o, ref in others if validate_math_response(o, ref).correct]
    # The rest are concept explanations: nothing to grade against, even though they hold numbers.
    concepts = [r["output"] for r in records if "\\boxed" not in r["output"]]
    assert concepts and all(reference_answer(o) is None for o in concepts)


def _pairs() -> list[tuple[str, str]]:
    table = [(case.values[0], case.values[1]) for case in CASES]
    return table + [(w, GSM_JANET) for w in WEIRD] + [(GSM_JANET, w) for w in WEIRD]


def test_same_verdicts_from_worker_threads():
    pairs = _pairs()
    expected = [validate_math_response(r, ref) for r, ref in pairs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda p: validate_math_response(*p), pairs))
    assert got == expected


def test_same_verdicts_from_worker_processes():
    pairs = _pairs()
    expected = [validate_math_response(r, ref) for r, ref in pairs]
    # spawn: a fresh interpreter, nothing inherited from this one; each task runs in the worker's main thread.
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        got = list(pool.map(validate_math_response, [r for r, _ in pairs], [ref for _, ref in pairs], chunksize=8))
    assert got == expected


def test_worker_thread_waits_at_most_the_timeout(monkeypatch):
    # Outside the main thread math-verify has no alarm; the wait for the helper thread is the bound.
    release = threading.Event()

    def stuck(response, reference, timeout):
        release.wait(10)
        return Verdict(True, "18", "18", "correct")

    monkeypatch.setattr(verify_module, "_judge", stuck)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as pool:
        verdict = pool.submit(validate_math_response, "The answer is 18.", GSM_JANET, 0.3).result()
    release.set()
    assert time.perf_counter() - start < 3
    assert verdict == Verdict(False, "18", "18", "parse_error")


def test_main_thread_timeout_stops_a_slow_comparison(monkeypatch):
    # A comparison that would run for a minute (a stand-in for SymPy on huge expressions, whose speed
    # depends on the machine); math-verify's alarm must stop it and the verdict says so.
    import math_verify.grader

    def slow_comparison(*args, **kwargs):
        deadline = time.perf_counter() + 60
        while time.perf_counter() < deadline:
            pass
        return True

    monkeypatch.setattr(math_verify.grader, "sympy_expr_eq", slow_comparison)
    start = time.perf_counter()
    verdict = validate_math_response("The answer is 18.", GSM_JANET, timeout_seconds=1)
    assert verdict.reason == "parse_error"
    assert time.perf_counter() - start < 30  # stopped by the 1 s alarm, not by the 60 s loop


def test_fractional_timeout_in_main_thread():
    # signal.alarm takes whole seconds; a float would make math-verify fail on every answer.
    assert validate_math_response("The answer is 7/8.", REF_FRAC, timeout_seconds=0.5).correct
    assert validate_math_response("The answer is 7/8.", REF_FRAC, timeout_seconds=None).correct


# Several boxes joined only by commas, "and", "y", "o", "or", "\text{ and }" or "\quad" on one line are
# the answers of a list; anything else between them (a sentence, a line break) leaves the last box.
SEVERAL_BOXES = [
    ("\\boxed{1}, \\boxed{2}, \\boxed{3}", "{1,2,3}"),
    ("The solutions are $\\boxed{1}$, $\\boxed{2}$ and $\\boxed{3}$.", "\\boxed{\\{1, 2, 3\\}}"),
    ("\\boxed{3} y \\boxed{-2}", REF_QUAD),
    ("x = 3 o x = -2: \\boxed{x = 3} o \\boxed{x = -2}", REF_QUAD),
    ("\\boxed{-2} \\quad \\boxed{3}", REF_QUAD),
    ("\\boxed{-2}\\text{, }\\boxed{3}", REF_QUAD),
    ("\\boxed{(2, 2)} \\text{ and } \\boxed{(6, 2)}", "\\boxed{(2, 2), (6, 2)}"),
    ("\\boxed{(2, 2)} \\text{ and } \\boxed{(6, 2)}", "(2,2) and (6,2)"),
    ("\\boxed{(2, 2)} \\text{ and } \\boxed{(6, 2)}", "\\{(2,2),(6,2)\\}"),
    ("Los pares son \\boxed{(6, 2)}, \\boxed{(2, 2)}.", "Las soluciones son \\boxed{(2, 2)} y \\boxed{(6, 2)}."),
]


@pytest.mark.parametrize(("response", "reference"), SEVERAL_BOXES)
def test_boxes_joined_on_one_line_are_a_list_of_answers(response, reference):
    verdict = validate_math_response(response, reference)
    assert (verdict.correct, verdict.reason) == (True, "correct"), verdict


def test_boxes_apart_leave_the_last_box():
    assert stated_answer("\\boxed{1}, \\boxed{2}, \\boxed{3}") == "1, 2, 3"
    assert reference_answer("Las soluciones son \\boxed{(2, 2)} y \\boxed{(6, 2)}.") == "(2, 2), (6, 2)"
    # An intermediate result, then the final one: a sentence or a line lies between them.
    for response in [
        "So \\boxed{5} apples are left. Therefore the answer is \\boxed{7}.",
        "Step 1: \\boxed{5}\nStep 2: \\boxed{7}",
        "Primero \\boxed{5}, luego sumamos 2: \\boxed{7}",
        "\\boxed{5}.\n\\boxed{7}",
    ]:
        assert stated_answer(response) == "7", response
        assert validate_math_response(response, "#### 7").correct, response
    # A list is graded as a whole: one right answer among wrong ones is not correct.
    assert not validate_math_response("\\boxed{7}, \\boxed{8}", "#### 7").correct
    assert not validate_math_response("\\boxed{(2, 2)} \\text{ and } \\boxed{(6, 3)}", "\\boxed{(2, 2), (6, 2)}").correct
    assert not validate_math_response("\\boxed{(6, 2)}", "\\boxed{(2, 2)} \\text{ and } \\boxed{(6, 2)}").correct


@pytest.mark.parametrize(
    ("response", "reference"),
    [
        ("The answer is $14{,}916$.", "#### 14916"),
        ("\\boxed{14{,}916}", "14916"),
        ("The answer is 14916.", "\\boxed{14{,}916}"),
        ("\\boxed{14{,}916}", "14{,}916"),
        ("\\boxed{1{,}000{,}000}", "#### 1,000,000"),
        ("La respuesta es 1.000.000", "The answer is $\\boxed{1{,}000{,}000}$."),
        ("\\boxed{14\\,916}", "#### 14,916"),
        ("\\boxed{14\\!916}", "#### 14,916"),
    ],
)
def test_latex_thousands(response, reference):
    verdict = validate_math_response(response, reference)
    assert (verdict.correct, verdict.reason) == (True, "correct"), verdict


def test_latex_decimal_comma_stays_a_decimal():
    # "{,}" before anything but groups of three digits is Spanish typesetting's decimal comma.
    assert validate_math_response("\\boxed{2{,}5}", "#### 2.5").correct
    assert validate_math_response("\\boxed{3{,}14}", "3.14").correct
    assert not validate_math_response("\\boxed{14{,}916}", "#### 14.916").correct


# A last sentence that states its result after a verb, without "the answer is": the expression after
# the verb, not math-verify's rightmost number ("6x + 2" was read as 2).
STATED_BY_A_VERB = [
    ("Derivamos término a término.\nLa derivada es 6x + 2.", "6x + 2", "6x + 2"),
    ("La derivada de 3x^2 + 2x es 6x + 2", "\\boxed{6x + 2}", "6x + 2"),
    ("Por la regla de la potencia, f'(x) = 6x + 2.", "6x + 2", "6x + 2"),
    ("Sumando, el total vale 3x + 1.", "3x + 1", "3x + 1"),
    ("Simplificando, queda 2x - 4.", "2(x - 2)", "2x - 4"),
    ("Al integrar resulta x^3 + 2x + C.", "\\boxed{x^3 + 2x + C}", "x^3 + 2x + C"),
    ("Las raíces son 2 y 3.", "\\boxed{2, 3}", "2 y 3"),
    ("The derivative is 6x + 2.", "6x + 2", "6x + 2"),
    ("Adding both parts, the sum equals 4x + 1.", "4x + 1", "4x + 1"),
    ("The slope is 0.5.", "\\boxed{\\frac{1}{2}}", "0.5"),
    ("So the perimeter is 2(5 + 4) = 18 cm for 2 rectangles.", REF_RECT, "18 cm for 2 rectangles"),
    ("La derivada es 6x + 2, que es una recta.", "6x + 2", "6x + 2, que es una recta"),
]


@pytest.mark.parametrize(("response", "reference", "predicted"), STATED_BY_A_VERB)
def test_a_last_sentence_states_its_result_after_the_verb(response, reference, predicted):
    verdict = validate_math_response(response, reference)
    assert verdict == Verdict(True, predicted, reference_answer(reference), "correct")


def test_a_verb_followed_by_prose_is_not_an_answer():
    # Nothing mathematical after the verb: no answer, rather than a word or a number from the working.
    for response in ["El resultado es correcto.", "La derivada es positiva.", "The function is increasing."]:
        assert validate_math_response(response, "6x + 2").reason == "no_answer", response
    # ... and where the working holds a number, math-verify's own reading stands.
    assert validate_math_response("Entonces x = 3. Esto es correcto.", "#### 3").correct
    assert validate_math_response("La derivada es 6x + 2.", "#### 2").reason == "mismatch"
    # The rule only reads a response: prose in a reference is still not a checkable answer.
    assert reference_answer("La derivada es 6x + 2.") is None
    assert stated_answer("La derivada es 6x + 2.") is None  # not announced: may be the working of a cut-off answer


def test_a_statement_cut_off_by_the_token_limit_is_left_to_math_verify():
    # An unclosed box or fraction after the verb is not a stated expression; the verdict stays the
    # fallback's (its rightmost number, or nothing), never a parse error on the fragment.
    assert validate_math_response("La derivada es \\boxed{6x + 2", "6x + 2") == Verdict(False, "2", "6x + 2", "mismatch")
    assert validate_math_response("So the total is \\frac{3}{", "#### 3") == Verdict(False, None, "3", "no_answer")
