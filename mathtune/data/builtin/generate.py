r"""Generate the bundled bilingual math dataset.

Run ``python -m mathtune.data.builtin.generate [--out DIR] [--seed N]``. It writes
``pairs.jsonl`` (Alpaca shape) and ``conversations.jsonl`` (OpenAI shape) into DIR
(default: this folder). The same seed always gives byte-identical files.

Example line of ``pairs.jsonl`` (a real record)::

    {"instruction": "Calculate 30 ÷ 5.", "output": "We divide 30 by 5: 30 ÷ 5 = 6, since 6 × 5 = 30.\nThe answer is \\boxed{6}.", "topic": "arithmetic", "lang": "en"}

Example line of ``conversations.jsonl`` (a real record, wrapped here)::

    {"messages": [{"role": "user", "content": "Solve for x: 6x - 7 = 11."},
                  {"role": "assistant", "content": "Add 7 to both sides: 6x = 18.\nDivide by 6: x = 3.\nThe answer is \\boxed{3}."},
                  {"role": "user", "content": "And if it were 3 instead of 6?"},
                  {"role": "assistant", "content": "Add 7 to both sides: 3x = 18.\nDivide by 3: x = 6.\nThe answer is \\boxed{6}."}],
     "topic": "linear_equations", "lang": "en"}

Design notes:
* Every final answer is computed here (``fractions``, ``math``, ``sympy``); nothing is
  typed by hand except the short concept explanations, which carry no ``\boxed{}``.
* Problems are templated with small numbers and a few phrasings per topic so that
  a ~135M model can pick up both the method and the answer format in a few steps.
* :func:`generate_records` returns the records with a private ``_answers`` list (one
  sympy value or ``None`` per assistant turn) so tests can check every boxed answer;
  the writer drops keys starting with ``_``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from fractions import Fraction
from pathlib import Path
from typing import Callable, NamedTuple

import sympy as sp

X = sp.Symbol("x")
C = sp.Symbol("C")  # integration constant, kept as a symbol so answers stay checkable
TOPICS = ["arithmetic", "fractions", "percentages", "divisibility", "linear_equations", "quadratics",
          "derivatives", "integrals", "geometry", "probability", "powers_roots", "sequences"]
WORKED_PAIRS_PER_TOPIC = 44  # plus 8 concept pairs per topic (2 concepts x 2 langs x 2 phrasings)
CONVERSATIONS_PER_TOPIC = 16
SYSTEM = {"es": "Eres un tutor de matemáticas. Responde con pasos breves y la respuesta final en \\boxed{}.",
          "en": "You are a math tutor. Answer with short steps and the final answer in \\boxed{}."}
GENERIC_INSTRUCTION = {"es": "Resuelve el siguiente problema paso a paso.",
                       "en": "Solve the following problem step by step."}


class Problem(NamedTuple):
    question: str
    steps: list[str]  # 1-3 short lines of working
    value: sp.Basic  # the true answer, used by the tests
    tex: str  # what goes inside \boxed{}


def L(lang: str, es: str, en: str) -> str:
    return es if lang == "es" else en


def tpl(p: dict, lang: str, table: dict) -> str:
    """Template fixed at sampling time, so follow-ups keep the same phrasing."""
    options = table[lang]
    return options[p["tpl"] % len(options)]


def plain(expr) -> str:
    """Readable plain-text form for working lines: 3*x**4 -> 3x^4, 25*pi -> 25π."""
    return str(sp.sympify(expr)).replace("**", "^").replace("*", "").replace("pi", "π")


def frac(r: Fraction) -> str:
    return str(r.numerator) if r.denominator == 1 else f"{r.numerator}/{r.denominator}"


def problem(value, steps, question, tex=None) -> Problem:
    """Bundle a solved problem; by default the boxed text is sympy's LaTeX of the computed value."""
    value = sp.Rational(value.numerator, value.denominator) if isinstance(value, Fraction) else sp.sympify(value)
    return Problem(question, steps, value, tex if tex is not None else sp.latex(value))


def signed(n: int) -> str:
    """' + 5' or ' - 5', for writing equations like 3x - 5 = 16."""
    return f" + {n}" if n > 0 else f" - {-n}"


def factor_str(n: int) -> str:
    return " × ".join(f"{p}^{e}" if e > 1 else str(p) for p, e in sorted(sp.factorint(n).items()))


# --------------------------------------------------------------------------- arithmetic
ARITH_Q = {"es": ["¿Cuánto es {e}?", "Calcula {e}.", "Resuelve: {e}", "Halla el resultado de {e}."],
           "en": ["What is {e}?", "Compute {e}.", "Calculate {e}.", "Find the value of {e}."]}
OPS = {"add": "+", "sub": "-", "mul": "×", "div": "÷"}


def sample_arithmetic(rng):
    kind = rng.choice(sorted(OPS))
    if kind == "div":
        b = rng.randint(2, 9)
        return {"kind": kind, "a": b * rng.randint(3, 15), "b": b}
    if kind == "mul":
        return {"kind": kind, "a": rng.randint(12, 99), "b": rng.randint(2, 9)}
    return {"kind": kind, "a": rng.randint(10, 99), "b": rng.randint(10, 99)}


def solve_arithmetic(p, lang):
    k, a, b = p["kind"], p["a"], p["b"]
    q = tpl(p, lang, ARITH_Q).format(e=f"{a} {OPS[k]} {b}")
    if k == "add":
        r = a + b
        steps = [L(lang, f"Sumamos {a} y {b}: {a} + {b} = {r}.", f"We add {a} and {b}: {a} + {b} = {r}.")]
    elif k == "sub":
        r = a - b
        steps = [L(lang, f"Restamos {b} a {a}: {a} - {b} = {r}.", f"We subtract {b} from {a}: {a} - {b} = {r}.")]
    elif k == "mul":
        if not (2 <= b <= 9 and a <= 99):  # stay at 2-digit × 1-digit, the pattern being taught
            return None
        r, t, u = a * b, a - a % 10, a % 10
        if t and u:  # split the 2-digit factor into tens and units: easy partial products
            steps = [L(lang, f"Descomponemos {a} = {t} + {u}.", f"We split {a} = {t} + {u}."),
                     f"{t} × {b} + {u} × {b} = {t * b} + {u * b} = {r}."]
        else:
            steps = [L(lang, "Multiplicamos: ", "We multiply: ") + f"{a} × {b} = {r}."]
    else:
        if b < 2 or a % b:
            return None
        r = a // b
        steps = [L(lang, f"Dividimos {a} entre {b}: {a} ÷ {b} = {r}, porque {r} × {b} = {a}.",
                   f"We divide {a} by {b}: {a} ÷ {b} = {r}, since {r} × {b} = {a}.")]
    return problem(r, steps, q)


# --------------------------------------------------------------------------- fractions
FRAC_Q = {"es": ["¿Cuánto es {e}?", "Calcula {e} y simplifica.", "Opera y simplifica: {e}"],
          "en": ["What is {e}?", "Compute {e} and simplify.", "Work out {e} in simplest form."]}
SIMPLIFY_Q = {"es": ["Simplifica la fracción {e}.", "Reduce {e} a su forma irreducible.", "Escribe {e} en su forma más simple."],
              "en": ["Simplify the fraction {e}.", "Reduce {e} to lowest terms.", "Write {e} in simplest form."]}


def sample_fractions(rng):
    def reduced(q):  # numerator of a proper fraction in lowest terms with denominator q
        return rng.choice([k for k in range(1, q) if math.gcd(k, q) == 1])

    kind = rng.choice(["add", "sub", "mul", "simplify"])
    if kind == "simplify":
        q, m = rng.randint(2, 9), rng.randint(2, 6)
        return {"kind": kind, "a": reduced(q) * m, "b": q * m}
    b, d = rng.randint(2, 9), rng.randint(2, 9)
    return {"kind": kind, "a": reduced(b), "b": b, "c": reduced(d), "d": d}


def solve_fractions(p, lang):
    if p["kind"] == "simplify":
        a, b = p["a"], p["b"]
        g = math.gcd(a, b)
        if b < 2 or g == 1:
            return None
        r = Fraction(a, b)
        steps = [L(lang, f"El máximo común divisor de {a} y {b} es {g}.",
                   f"The greatest common divisor of {a} and {b} is {g}."),
                 L(lang, f"Dividimos ambos entre {g}: {a}/{b} = {frac(r)}.", f"Divide both by {g}: {a}/{b} = {frac(r)}.")]
        return problem(r, steps, tpl(p, lang, SIMPLIFY_Q).format(e=f"{a}/{b}"))
    k, a, b, c, d = p["kind"], p["a"], p["b"], p["c"], p["d"]
    if min(b, d) < 2 or min(a, c) < 1:
        return None
    e = f"{a}/{b} {OPS[k]} {c}/{d}"
    if k == "mul":
        n, m = a * c, b * d
        steps = [L(lang, f"Multiplicamos numeradores y denominadores: {e} = {n}/{m}.",
                   f"Multiply numerators and denominators: {e} = {n}/{m}.")]
    else:
        m = math.lcm(b, d)
        x, y = a * (m // b), c * (m // d)
        n = x + y if k == "add" else x - y
        steps = [L(lang, "Denominador común ", "Common denominator ") + f"{m}: {x}/{m} {OPS[k]} {y}/{m} = {n}/{m}."]
    r = Fraction(n, m)
    if r.denominator != m:
        steps.append(L(lang, "Simplificamos: ", "Simplify: ") + f"{n}/{m} = {frac(r)}.")
    return problem(r, steps, tpl(p, lang, FRAC_Q).format(e=e))


# --------------------------------------------------------------------------- percentages
PCT_Q = {
    "of": {"es": ["¿Cuánto es el {x} % de {n}?", "Calcula el {x} % de {n}.", "Halla el {x} % de {n}."],
           "en": ["What is {x}% of {n}?", "Compute {x}% of {n}.", "Find {x}% of {n}."]},
    "what": {"es": ["¿Qué porcentaje de {n} es {m}?", "¿{m} es qué porcentaje de {n}?", "Expresa {m} como porcentaje de {n}."],
             "en": ["What percent of {n} is {m}?", "{m} is what percent of {n}?", "Express {m} as a percentage of {n}."]},
    "up": {"es": ["Un artículo cuesta {n} euros y su precio sube un {x} %. ¿Cuál es el nuevo precio?",
                  "Un precio de {n} euros aumenta un {x} %. ¿Cuánto vale ahora?"],
           "en": ["An item costs {n} euros and its price rises by {x}%. What is the new price?",
                  "A price of {n} euros increases by {x}%. What is it now?"]},
    "down": {"es": ["Una camiseta cuesta {n} euros y tiene un descuento del {x} %. ¿Cuánto cuesta ahora?",
                    "Un precio de {n} euros baja un {x} %. ¿Cuál es el precio final?"],
             "en": ["A shirt costs {n} euros and has a {x}% discount. How much does it cost now?",
                    "A price of {n} euros drops by {x}%. What is the final price?"]},
}


def sample_percentages(rng):
    kind = rng.choice(sorted(PCT_Q))
    x, n = rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 80]), rng.randrange(20, 401, 20)
    if kind == "what":
        return {"kind": kind, "n": n, "m": x * n // 100}
    return {"kind": kind, "x": x, "n": n}


def solve_percentages(p, lang):
    k, n = p["kind"], p["n"]
    if k == "what":
        m = p["m"]
        if m < 1 or (100 * m) % n:
            return None
        r = 100 * m // n
        steps = [L(lang, "Dividimos y multiplicamos por 100: ", "Divide and multiply by 100: ") + f"{m}/{n} × 100 = {r}."]
        return problem(r, steps, tpl(p, lang, PCT_Q[k]).format(n=n, m=m))
    x = p["x"]
    if not 1 <= x < 100 or (x * n) % 100:
        return None
    part = x * n // 100
    pct = L(lang, f"{x} %", f"{x}%")
    if k == "of":
        r = part
        steps = [L(lang, f"El {pct} de {n} es ", f"{pct} of {n} is ") + f"{x}/100 × {n} = {r}."]
    elif k == "up":
        r = n + part
        steps = [L(lang, "Aumento: ", "Increase: ") + f"{x}/100 × {n} = {part}.",
                 L(lang, "Nuevo precio: ", "New price: ") + f"{n} + {part} = {r}."]
    else:
        r = n - part
        steps = [L(lang, "Descuento: ", "Discount: ") + f"{x}/100 × {n} = {part}.",
                 L(lang, "Precio final: ", "Final price: ") + f"{n} - {part} = {r}."]
    return problem(r, steps, tpl(p, lang, PCT_Q[k]).format(x=x, n=n))


# --------------------------------------------------------------------------- divisibility
DIV_Q = {
    "gcd": {"es": ["Calcula el máximo común divisor de {a} y {b}.", "¿Cuál es el mcd de {a} y {b}?", "Halla mcd({a}, {b})."],
            "en": ["Find the greatest common divisor of {a} and {b}.", "What is gcd({a}, {b})?", "Compute the GCD of {a} and {b}."]},
    "lcm": {"es": ["Calcula el mínimo común múltiplo de {a} y {b}.", "¿Cuál es el mcm de {a} y {b}?", "Halla mcm({a}, {b})."],
            "en": ["Find the least common multiple of {a} and {b}.", "What is lcm({a}, {b})?", "Compute the LCM of {a} and {b}."]},
    "prime": {"es": ["¿Cuál es el menor número primo mayor que {a}?", "Halla el primer número primo después de {a}."],
              "en": ["What is the smallest prime number greater than {a}?", "Find the first prime number after {a}."]},
}


def sample_divisibility(rng):
    kind = rng.choice(sorted(DIV_Q))
    if kind == "gcd":
        g, u, v = rng.randint(2, 12), *rng.sample([2, 3, 4, 5, 7, 8, 9], 2)
        return {"kind": kind, "a": g * u, "b": g * v}
    if kind == "lcm":
        a, b = rng.sample(range(4, 31), 2)
        return {"kind": kind, "a": a, "b": b}
    return {"kind": kind, "a": rng.randint(10, 90)}


def solve_divisibility(p, lang):
    k, a = p["kind"], p["a"]
    q = tpl(p, lang, DIV_Q[k]).format(**p)
    if k == "prime":
        if a < 2:
            return None
        r = int(sp.nextprime(a))
        # show the smallest factor of each skipped number: that is why it is not prime
        checks = [f"{n} = {min(sp.factorint(n))} × {n // min(sp.factorint(n))}" for n in range(a + 1, r)]
        tail = L(lang, f"{r} es primo.", f"{r} is prime.")
        steps = [L(lang, "Comprobamos: ", "We check: ") + ", ".join(checks) + "; " + tail] if checks else [tail]
        return problem(r, steps, q)
    b = p["b"]
    if a == b or sp.isprime(a) or sp.isprime(b) or min(a, b) < 4:  # composite inputs keep the factor lines meaningful
        return None
    facts = f"{a} = {factor_str(a)}" + L(lang, " y ", " and ") + f"{b} = {factor_str(b)}."
    if k == "gcd":
        r = math.gcd(a, b)
        if r == 1:
            return None
        rule = L(lang, "Factores comunes con el menor exponente: ", "Common factors with the lowest exponent: ")
    else:
        r = math.lcm(a, b)
        if r > 400:
            return None
        rule = L(lang, "Factores comunes y no comunes con el mayor exponente: ",
                 "All prime factors with the highest exponent: ")
    fs = factor_str(r)
    return problem(r, [facts, rule + (fs if fs == str(r) else f"{fs} = {r}") + "."], q)


# --------------------------------------------------------------------------- linear equations
LIN_Q = {"es": ["Resuelve {e}.", "Halla x si {e}.", "Encuentra el valor de x en {e}."],
         "en": ["Solve {e}.", "Find x if {e}.", "Solve for x: {e}."]}


def sample_linear_equations(rng):
    kind, a, x = rng.choice(["axb", "axb", "paren"]), rng.randint(2, 9), rng.randint(-9, 12)
    b = rng.choice([n for n in range(-15, 16) if n])
    return {"kind": kind, "a": a, "b": b, "c": a * x + b if kind == "axb" else a * (x + b)}


def solve_linear_equations(p, lang):
    k, a, b, c = p["kind"], p["a"], p["b"], p["c"]
    move = L(lang, "Restamos" if b > 0 else "Sumamos", "Subtract" if b > 0 else "Add")
    if a < 2 or b == 0:
        return None
    if k == "axb":
        if (c - b) % a:
            return None
        x, e = (c - b) // a, f"{a}x{signed(b)} = {c}"
        steps = [L(lang, f"{move} {abs(b)} a ambos lados: {a}x = {c - b}.",
                   f"{move} {abs(b)} {'from' if b > 0 else 'to'} both sides: {a}x = {c - b}."),
                 L(lang, "Dividimos entre ", "Divide by ") + f"{a}: x = {x}."]
    else:
        if c % a:
            return None
        x, e = c // a - b, f"{a}(x{signed(b)}) = {c}"
        steps = [L(lang, "Dividimos entre ", "Divide by ") + f"{a}: x{signed(b)} = {c // a}.",
                 f"{move} {abs(b)}: x = {x}."]
    return problem(x, steps, tpl(p, lang, LIN_Q).format(e=e))


# --------------------------------------------------------------------------- quadratics
QUAD_Q = {"es": ["Resuelve {e}.", "Halla las soluciones de {e}.", "Encuentra los valores de x tales que {e}."],
          "en": ["Solve {e}.", "Find the solutions of {e}.", "Find all x such that {e}."]}


def sample_quadratics(rng):
    kind = rng.choice(["factor", "factor", "diffsq", "common"])
    if kind == "diffsq":
        return {"kind": kind, "c": rng.randint(2, 12) ** 2}
    if kind == "common":
        return {"kind": kind, "b": rng.choice([n for n in range(-9, 10) if n])}
    r1, r2 = rng.choice([(r1, r2) for r1 in range(-6, 7) for r2 in range(r1, 7) if r1 * r2 and r1 + r2])
    return {"kind": kind, "b": -(r1 + r2), "c": r1 * r2}


def solve_quadratics(p, lang):
    k = p["kind"]
    if k == "diffsq":
        c = p["c"]
        r = math.isqrt(c)
        if c < 1 or r * r != c:
            return None
        poly, roots = X**2 - c, [-r, r]
        steps = [L(lang, "Despejamos: ", "Isolate x^2: ") + f"x^2 = {c}.", f"x = ±√{c} = ±{r}."]
    elif k == "common":
        b = p["b"]
        if b == 0:
            return None
        poly, roots = X**2 + b * X, [0, -b]
        steps = [L(lang, "Sacamos factor común x: ", "Factor out x: ") + f"x(x{signed(b)}) = 0.",
                 L(lang, f"Entonces x = 0 o x = {-b}.", f"So x = 0 or x = {-b}.")]
    else:
        b, c = p["b"], p["c"]
        disc = b * b - 4 * c
        if b == 0 or c == 0 or disc < 0 or math.isqrt(disc) ** 2 != disc:
            return None
        s = math.isqrt(disc)
        r1, r2 = (-b - s) // 2, (-b + s) // 2
        poly, roots = X**2 + b * X + c, [r1, r2]
        steps = [L(lang, f"Buscamos dos números que sumen {-b} y multipliquen {c}: {r1} y {r2}.",
                   f"We need two numbers with sum {-b} and product {c}: {r1} and {r2}."),
                 L(lang, "Factorizamos: ", "Factor: ") + f"{plain(sp.factor(poly))} = 0."]
    roots = sorted(set(roots))
    q = tpl(p, lang, QUAD_Q).format(e=f"{plain(poly)} = 0")
    return problem(sp.FiniteSet(*roots), steps, q, tex=", ".join(map(str, roots)))


# --------------------------------------------------------------------------- derivatives
DER_Q = {"es": ["Deriva f(x) = {f}.", "Calcula la derivada de f(x) = {f}.", "Halla f'(x) si f(x) = {f}."],
         "en": ["Differentiate f(x) = {f}.", "Find the derivative of f(x) = {f}.", "Find f'(x) if f(x) = {f}."]}


def sample_derivatives(rng):
    p = {"kind": rng.choice(["mono", "poly"]), "a": rng.randint(2, 9), "n": rng.randint(2, 6)}
    if p["kind"] == "poly":
        p.update(n=rng.randint(2, 5), b=rng.choice([n for n in range(-9, 10) if n]), c=rng.randint(1, 9))
    return p


def solve_derivatives(p, lang):
    a, n = p["a"], p["n"]
    if a < 1 or n < 2:
        return None
    rule = L(lang, "Regla de la potencia: ", "Power rule: ") + "(x^n)' = n x^(n-1)."
    if p["kind"] == "mono":
        f = a * X**n
        d = sp.diff(f, X)
        steps = [rule, f"{a} × {plain(n * X**(n - 1))} = {plain(d)}."]
    else:
        b, c = p["b"], p["c"]
        if b == 0 or c < 1:
            return None
        f = a * X**n + b * X + c
        d = sp.diff(f, X)
        terms = f"({plain(a * X**n)})' = {plain(a * n * X**(n - 1))}, ({plain(b * X)})' = {b}"
        steps = [rule, L(lang, f"Término a término: {terms} y ({c})' = 0.", f"Term by term: {terms} and ({c})' = 0.")]
    return problem(d, steps, tpl(p, lang, DER_Q).format(f=plain(f)))


# --------------------------------------------------------------------------- integrals
INT_Q = {
    "indef": {"es": ["Calcula la integral de {f} dx.", "Halla ∫ {f} dx.", "Integra {f} respecto de x."],
              "en": ["Find the integral of {f} dx.", "Compute ∫ {f} dx.", "Integrate {f} with respect to x."]},
    "def": {"es": ["Calcula la integral de {f} entre {lo} y {hi}.", "Halla ∫ de {lo} a {hi} de {f} dx."],
            "en": ["Compute the integral of {f} from {lo} to {hi}.", "Evaluate ∫ from {lo} to {hi} of {f} dx."]},
}


def sample_integrals(rng):
    kind = rng.choice(["indef", "indef", "def"])
    n = rng.randint(1, 4 if kind == "indef" else 3)
    p = {"kind": kind, "a": (n + 1) * rng.randint(1, 5 if kind == "indef" else 2), "n": n}
    if kind == "def":
        p["lo"] = rng.choice([0, 0, 1])
        p["hi"] = rng.randint(p["lo"] + 1, 3)
    return p


def solve_integrals(p, lang):
    a, n = p["a"], p["n"]
    if n < 1 or a < 1 or a % (n + 1):  # whole-number coefficients keep the pattern simple
        return None
    f, F = a * X**n, sp.integrate(a * X**n, X)
    if p["kind"] == "indef":
        steps = [L(lang, "Regla de la potencia: ", "Power rule: ") + "∫ x^n dx = x^(n+1)/(n+1) + C.",
                 f"∫ {plain(f)} dx = {a} × {plain(X**(n + 1))}/{n + 1} + C = {plain(F)} + C."]
        q = tpl(p, lang, INT_Q["indef"]).format(f=plain(f))
        return problem(F + C, steps, q, tex=sp.latex(F) + " + C")
    lo, hi = p["lo"], p["hi"]
    if not 0 <= lo < hi:
        return None
    Fhi, Flo = F.subs(X, hi), F.subs(X, lo)
    steps = [L(lang, f"Una primitiva de {plain(f)} es F(x) = {plain(F)}.",
               f"An antiderivative of {plain(f)} is F(x) = {plain(F)}."),
             f"F({hi}) - F({lo}) = {Fhi} - {Flo} = {Fhi - Flo}."]
    return problem(Fhi - Flo, steps, tpl(p, lang, INT_Q["def"]).format(f=plain(f), lo=lo, hi=hi))


# --------------------------------------------------------------------------- geometry
GEO_Q = {
    "rect_area": {"es": ["Calcula el área de un rectángulo de lados {w} y {h}.", "Un rectángulo mide {w} de base y {h} de altura. ¿Cuál es su área?"],
                  "en": ["Find the area of a rectangle with sides {w} and {h}.", "A rectangle has width {w} and height {h}. What is its area?"]},
    "rect_perim": {"es": ["Calcula el perímetro de un rectángulo de lados {w} y {h}.", "¿Cuál es el perímetro de un rectángulo de {w} por {h}?"],
                   "en": ["Find the perimeter of a rectangle with sides {w} and {h}.", "What is the perimeter of a {w} by {h} rectangle?"]},
    "tri_area": {"es": ["Calcula el área de un triángulo de base {w} y altura {h}.", "Un triángulo tiene base {w} y altura {h}. ¿Cuál es su área?"],
                 "en": ["Find the area of a triangle with base {w} and height {h}.", "A triangle has base {w} and height {h}. What is its area?"]},
    "circle_area": {"es": ["Calcula el área de un círculo de radio {w}. Deja el resultado en función de π."],
                    "en": ["Find the area of a circle of radius {w}. Leave the answer in terms of π."]},
    "circle_len": {"es": ["Calcula la longitud de una circunferencia de radio {w}, en función de π."],
                   "en": ["Find the circumference of a circle of radius {w}, in terms of π."]},
    "hyp": {"es": ["Los catetos de un triángulo rectángulo miden {w} y {h}. ¿Cuánto mide la hipotenusa?",
                   "Halla la hipotenusa de un triángulo rectángulo de catetos {w} y {h}."],
            "en": ["A right triangle has legs {w} and {h}. How long is the hypotenuse?",
                   "Find the hypotenuse of a right triangle with legs {w} and {h}."]},
}
TRIPLES = [(3, 4), (6, 8), (5, 12), (8, 15), (9, 12), (12, 16), (7, 24), (15, 20), (20, 21)]


def sample_geometry(rng):
    kind = rng.choice(sorted(GEO_Q))
    if kind.startswith("circle"):
        return {"kind": kind, "w": rng.randint(1, 10)}
    if kind == "hyp":
        w, h = rng.choice(TRIPLES)
        return {"kind": kind, "w": w, "h": h} if rng.random() < 0.5 else {"kind": kind, "w": h, "h": w}
    w, h = rng.sample(range(2, 21), 2)
    if kind == "tri_area" and w * h % 2:
        h += 1
    return {"kind": kind, "w": w, "h": h}


def solve_geometry(p, lang):
    k, w, h = p["kind"], p["w"], p.get("h", 1)
    if min(w, h) < 1:
        return None
    q = tpl(p, lang, GEO_Q[k]).format(**p)
    if k == "rect_area":
        r = w * h
        steps = [L(lang, "Área = base × altura = ", "Area = width × height = ") + f"{w} × {h} = {r}."]
    elif k == "rect_perim":
        r = 2 * (w + h)
        steps = [L(lang, "Perímetro = ", "Perimeter = ") + f"2 × ({w} + {h}) = 2 × {w + h} = {r}."]
    elif k == "tri_area":
        if w * h % 2:
            return None
        r = w * h // 2
        steps = [L(lang, "Área = base × altura / 2 = ", "Area = base × height / 2 = ") + f"{w} × {h} / 2 = {r}."]
    elif k == "circle_area":
        r = w * w * sp.pi
        steps = [L(lang, "Área = π r^2 = ", "Area = π r^2 = ") + f"π × {w}^2 = {plain(r)}."]
    elif k == "circle_len":
        r = 2 * w * sp.pi
        steps = [L(lang, "Longitud = 2π r = ", "Circumference = 2π r = ") + f"2π × {w} = {plain(r)}."]
    else:
        s = w * w + h * h
        r = math.isqrt(s)
        if r * r != s:
            return None
        steps = [L(lang, "Por Pitágoras: ", "By Pythagoras: ") + f"c^2 = {w}^2 + {h}^2 = {w * w} + {h * h} = {s}.",
                 f"c = √{s} = {r}."]
    return problem(r, steps, q)


# --------------------------------------------------------------------------- probability
PROB_Q = {
    "die_gt": {"es": ["Se lanza un dado de seis caras. ¿Cuál es la probabilidad de sacar más de {k}?",
                      "Al lanzar un dado normal, ¿qué probabilidad hay de obtener un número mayor que {k}?"],
               "en": ["A fair six-sided die is rolled. What is the probability of getting more than {k}?",
                      "When rolling a fair die, what is the probability of a number greater than {k}?"]},
    "die_lt": {"es": ["Se lanza un dado de seis caras. ¿Cuál es la probabilidad de sacar menos de {k}?"],
               "en": ["A fair six-sided die is rolled. What is the probability of getting less than {k}?"]},
    "urn": {"es": ["Una bolsa tiene {k} bolas rojas y {m} azules. Se saca una al azar. ¿Cuál es la probabilidad de que sea roja?",
                   "En una urna hay {k} bolas rojas y {m} bolas azules. ¿Qué probabilidad hay de sacar una roja?"],
            "en": ["A bag has {k} red balls and {m} blue balls. One is drawn at random. What is the probability that it is red?",
                   "An urn contains {k} red and {m} blue balls. What is the probability of drawing a red one?"]},
    "sum": {"es": ["Se lanzan dos dados. ¿Cuál es la probabilidad de que la suma sea {k}?",
                   "Al lanzar dos dados, ¿qué probabilidad hay de que sumen {k}?"],
            "en": ["Two dice are rolled. What is the probability that the sum is {k}?",
                   "When rolling two dice, what is the probability that they add up to {k}?"]},
    "coins": {"es": ["Se lanzan {k} monedas. ¿Cuál es la probabilidad de que todas salgan cara?"],
              "en": ["We toss {k} coins. What is the probability that all of them land heads?"]},
}


def sample_probability(rng):
    kind = rng.choice(sorted(PROB_Q))
    k = {"die_gt": (1, 5), "die_lt": (2, 6), "urn": (1, 9), "sum": (2, 12), "coins": (2, 4)}[kind]
    p = {"kind": kind, "k": rng.randint(*k)}
    if kind == "urn":  # only the urn has a second number (blue balls)
        p["m"] = rng.randint(1, 9)
    return p


def solve_probability(p, lang):
    kind, k, m = p["kind"], p["k"], p.get("m", 0)
    fav_word, all_word = L(lang, "Casos favorables", "Favorable outcomes"), L(lang, "casos posibles", "possible outcomes")
    if kind in ("die_gt", "die_lt"):
        faces = list(range(k + 1, 7)) if kind == "die_gt" else list(range(1, k))
        if not 1 <= len(faces) <= 5:
            return None
        f, t = len(faces), 6
        first = f"{fav_word}: {f} ({', '.join(map(str, faces))}); {all_word}: 6."
    elif kind == "urn":
        if min(k, m) < 1:
            return None
        f, t = k, k + m
        first = f"{fav_word}: {k}; {all_word}: {k} + {m} = {t}."
    elif kind == "sum":
        pairs = [(i, k - i) for i in range(1, 7) if 1 <= k - i <= 6]
        if not pairs:
            return None
        f, t = len(pairs), 36
        first = f"{fav_word}: {f} ({', '.join(f'{i}+{j}' for i, j in pairs)}); {all_word}: 36."
    else:
        if not 1 <= k <= 6:
            return None
        f, t = 1, 2**k
        first = L(lang, f"Casos posibles: 2^{k} = {t}; solo 1 es favorable (todas cara).",
                  f"Possible outcomes: 2^{k} = {t}; only 1 is favorable (all heads).")
    r = Fraction(f, t)
    q = tpl(p, lang, PROB_Q[kind]).format(k=k, m=m)
    return problem(r, [first, f"P = {f}/{t}" + (f" = {frac(r)}." if r.denominator != t else ".")], q)


# --------------------------------------------------------------------------- powers and roots
POW_Q = {
    "square": {"es": ["¿Cuánto es {a}^2?", "Calcula {a} al cuadrado.", "Halla el cuadrado de {a}."],
               "en": ["What is {a}^2?", "Compute {a} squared.", "Find the square of {a}."]},
    "cube": {"es": ["¿Cuánto es {a}^3?", "Calcula {a} al cubo.", "Halla el cubo de {a}."],
             "en": ["What is {a}^3?", "Compute {a} cubed.", "Find the cube of {a}."]},
    "sqrt": {"es": ["¿Cuánto es la raíz cuadrada de {a}?", "Calcula √{a}.", "Halla la raíz cuadrada de {a}."],
             "en": ["What is the square root of {a}?", "Compute √{a}.", "Find the square root of {a}."]},
    "cbrt": {"es": ["¿Cuánto es la raíz cúbica de {a}?", "Calcula ∛{a}."],
             "en": ["What is the cube root of {a}?", "Compute ∛{a}."]},
    "prod": {"es": ["Calcula {a}^{m} × {a}^{k}.", "¿Cuánto es {a}^{m} × {a}^{k}?"],
             "en": ["Compute {a}^{m} × {a}^{k}.", "What is {a}^{m} × {a}^{k}?"]},
}


def sample_powers_roots(rng):
    kind = rng.choice(sorted(POW_Q))
    a = {"square": rng.randint(2, 20), "cube": rng.randint(2, 9), "sqrt": rng.randint(2, 20) ** 2,
         "cbrt": rng.randint(2, 6) ** 3, "prod": rng.randint(2, 3)}[kind]
    p = {"kind": kind, "a": a}
    if kind == "prod":  # a^m × a^k: only this kind has exponents to vary
        p.update(m=rng.randint(2, 4), k=rng.randint(2, 5))
    return p


def solve_powers_roots(p, lang):
    kind, a, m, k = p["kind"], p["a"], p.get("m", 0), p.get("k", 0)
    if a < 2:
        return None
    if kind == "square":
        r = a * a
        steps = [L(lang, f"Multiplicamos {a} por sí mismo: ", f"Multiply {a} by itself: ") + f"{a} × {a} = {r}."]
    elif kind == "cube":
        r = a**3
        steps = [L(lang, f"Multiplicamos {a} tres veces: ", f"Multiply {a} three times: ") + f"{a} × {a} × {a} = {r}."]
    elif kind in ("sqrt", "cbrt"):
        e, sym = (2, "√") if kind == "sqrt" else (3, "∛")
        r = round(a ** (1 / e))
        if r**e != a:
            return None
        steps = [f"{sym}{a} = {r}" + L(lang, ", porque ", ", since ") + f"{r}^{e} = {a}."]
    else:
        if min(m, k) < 1 or m + k > 10:
            return None
        r = a ** (m + k)
        steps = [L(lang, "Sumamos los exponentes: ", "Add the exponents: ") + f"{a}^{m} × {a}^{k} = {a}^{m + k}.",
                 f"{a}^{m + k} = {r}."]
    return problem(r, steps, tpl(p, lang, POW_Q[kind]).format(a=a, m=m, k=k))


# --------------------------------------------------------------------------- sequences
SEQ_Q = {
    "terms": {"es": ["En la sucesión {t}, ..., ¿cuál es el término número {n}?", "Halla el término {n} de la progresión {t}, ..."],
              "en": ["In the sequence {t}, ..., what is term number {n}?", "Find term {n} of the sequence {t}, ..."]},
    "formula": {"es": ["Una progresión aritmética tiene a_1 = {a} y d = {d}. Halla a_{n}.",
                       "Si a_1 = {a} y d = {d}, ¿cuánto vale a_{n} en la progresión aritmética?"],
                "en": ["An arithmetic sequence has a_1 = {a} and d = {d}. Find a_{n}.",
                       "If a_1 = {a} and d = {d}, what is a_{n} in the arithmetic sequence?"]},
    "geo": {"es": ["¿Cuál es el siguiente término de la sucesión {t}, ...?", "Continúa la sucesión {t}, ... con un término más."],
            "en": ["What is the next term of the sequence {t}, ...?", "Continue the sequence {t}, ... with one more term."]},
    "sum": {"es": ["Calcula la suma de los números del 1 al {n}.", "¿Cuánto es 1 + 2 + ... + {n}?"],
            "en": ["Find the sum of the whole numbers from 1 to {n}.", "What is 1 + 2 + ... + {n}?"]},
}


def sample_sequences(rng):
    kind = rng.choice(sorted(SEQ_Q))
    if kind == "geo":  # first term a, ratio d
        return {"kind": kind, "a": rng.randint(1, 5), "d": rng.randint(2, 3)}
    if kind == "sum":
        return {"kind": kind, "n": rng.randint(5, 50)}
    return {"kind": kind, "a": rng.randint(1, 10), "d": rng.randint(2, 7), "n": rng.randint(8, 20)}


def solve_sequences(p, lang):
    kind, a, d, n = p["kind"], p.get("a", 1), p.get("d", 1), p.get("n", 2)
    if min(a, d) < 1 or n < 2:
        return None
    if kind == "geo":
        terms = [a * d**i for i in range(4)]
        r = terms[-1] * d
        steps = [L(lang, f"Cada término se multiplica por {d}.", f"Each term is multiplied by {d}."),
                 f"{terms[-1]} × {d} = {r}."]
    elif kind == "sum":
        r = n * (n + 1) // 2
        steps = [L(lang, "Usamos la fórmula n(n + 1)/2: ", "Use the formula n(n + 1)/2: ") + f"{n} × {n + 1} / 2 = {r}."]
        terms = []
    else:
        terms = [a + d * i for i in range(4)]
        r = a + (n - 1) * d
        first = L(lang, f"Es una progresión aritmética con d = {d}.", f"It is an arithmetic sequence with d = {d}.") \
            if kind == "terms" else L(lang, "Usamos a_n = a_1 + (n - 1)d.", "Use a_n = a_1 + (n - 1)d.")
        steps = [first, f"a_{n} = {a} + {n - 1} × {d} = {r}."]
    q = tpl(p, lang, SEQ_Q[kind]).format(t=", ".join(map(str, terms)), a=a, d=d, n=n)
    return problem(r, steps, q)


# --------------------------------------------------------------------------- concept explanations
# Hand-written, short and checked by eye; they have no final answer, hence no \boxed{}.
# (topic, Spanish name, Spanish text, English name, English text); two per topic.
_CONCEPTS = [
    ("arithmetic", "la propiedad conmutativa", "Es la propiedad que dice que el orden de los números no cambia el resultado en la suma y en la multiplicación. Por ejemplo, 3 + 5 = 5 + 3 y 4 × 7 = 7 × 4. No se cumple en la resta ni en la división.",
     "the commutative property", "It says that the order of the numbers does not change the result of an addition or a multiplication. For example, 3 + 5 = 5 + 3 and 4 × 7 = 7 × 4. It does not hold for subtraction or division."),
    ("arithmetic", "el orden de las operaciones", "Es la regla que indica qué se calcula primero: paréntesis, después potencias, después multiplicaciones y divisiones, y al final sumas y restas. Por ejemplo, 2 + 3 × 4 = 2 + 12 = 14.",
     "the order of operations", "It is the rule for what to compute first: parentheses, then powers, then multiplication and division, and finally addition and subtraction. For example, 2 + 3 × 4 = 2 + 12 = 14."),
    ("fractions", "una fracción", "Una fracción a/b representa a partes de un total dividido en b partes iguales. El número de arriba es el numerador y el de abajo, el denominador, que no puede ser 0. Por ejemplo, 3/4 son tres de cuatro partes.",
     "a fraction", "A fraction a/b represents a parts of a whole split into b equal parts. The top number is the numerator and the bottom one is the denominator, which cannot be 0. For example, 3/4 means three of four parts."),
    ("fractions", "una fracción irreducible", "Es una fracción cuyo numerador y denominador no tienen divisores comunes salvo el 1. Se obtiene dividiendo ambos entre su máximo común divisor: 6/8 = 3/4.",
     "a fraction in lowest terms", "It is a fraction whose numerator and denominator share no common divisor other than 1. You get it by dividing both by their greatest common divisor: 6/8 = 3/4."),
    ("percentages", "un porcentaje", "Un porcentaje es una fracción con denominador 100: el 25 % significa 25/100. Para calcular el x % de un número se multiplica por x/100; por ejemplo, el 25 % de 80 es 20.",
     "a percentage", "A percentage is a fraction with denominator 100: 25% means 25/100. To find x% of a number, multiply it by x/100; for example, 25% of 80 is 20."),
    ("percentages", "un descuento porcentual", "Es una rebaja igual a un porcentaje del precio. Se calcula el porcentaje y se resta: un descuento del 20 % sobre 50 euros es 10 euros, así que se paga 40.",
     "a percentage discount", "It is a reduction equal to a percentage of the price. Compute the percentage and subtract it: a 20% discount on 50 euros is 10 euros, so you pay 40."),
    ("divisibility", "un número primo", "Un número primo es un número natural mayor que 1 que solo es divisible entre 1 y entre sí mismo. Los primeros son 2, 3, 5, 7, 11 y 13. El 1 no es primo.",
     "a prime number", "A prime number is a natural number greater than 1 whose only divisors are 1 and itself. The first ones are 2, 3, 5, 7, 11 and 13. The number 1 is not prime."),
    ("divisibility", "el máximo común divisor", "El máximo común divisor (mcd) de dos números es el mayor número que divide a ambos. Por ejemplo, mcd(12, 18) = 6. Se obtiene con los factores primos comunes elevados al menor exponente.",
     "the greatest common divisor", "The greatest common divisor (gcd) of two numbers is the largest number that divides both. For example, gcd(12, 18) = 6. It is the product of the common prime factors with the lowest exponents."),
    ("linear_equations", "una ecuación lineal", "Es una ecuación en la que la incógnita aparece solo con exponente 1, como 3x + 5 = 20. Se resuelve dejando la x sola: se pasa el término independiente y se divide entre el coeficiente.",
     "a linear equation", "It is an equation where the unknown only appears to the first power, like 3x + 5 = 20. You solve it by isolating x: move the constant term and divide by the coefficient."),
    ("linear_equations", "la solución de una ecuación", "Es el valor de la incógnita que hace que la igualdad sea cierta. Por ejemplo, x = 5 es la solución de 2x + 1 = 11 porque 2 × 5 + 1 = 11.",
     "the solution of an equation", "It is the value of the unknown that makes the equality true. For example, x = 5 is the solution of 2x + 1 = 11 because 2 × 5 + 1 = 11."),
    ("quadratics", "una ecuación cuadrática", "Es una ecuación de la forma ax^2 + bx + c = 0 con a distinto de 0. Tiene como mucho dos soluciones reales, que se hallan factorizando o con la fórmula x = (-b ± √(b^2 - 4ac)) / (2a).",
     "a quadratic equation", "It is an equation of the form ax^2 + bx + c = 0 with a not equal to 0. It has at most two real solutions, found by factoring or with the formula x = (-b ± √(b^2 - 4ac)) / (2a)."),
    ("quadratics", "el discriminante", "En ax^2 + bx + c = 0, el discriminante es b^2 - 4ac. Si es positivo hay dos soluciones reales, si es cero hay una doble y si es negativo no hay soluciones reales.",
     "the discriminant", "In ax^2 + bx + c = 0, the discriminant is b^2 - 4ac. If it is positive there are two real solutions, if it is zero there is one double solution, and if it is negative there are no real solutions."),
    ("derivatives", "una derivada", "La derivada de una función mide cómo cambia su valor cuando x cambia un poco: es la pendiente de la recta tangente a la gráfica. Por ejemplo, la derivada de x^2 es 2x.",
     "a derivative", "The derivative of a function measures how fast its value changes when x changes a little: it is the slope of the tangent line to the graph. For example, the derivative of x^2 is 2x."),
    ("derivatives", "la regla de la potencia", "Es la regla que dice que la derivada de x^n es n x^(n-1). Por ejemplo, la derivada de x^3 es 3x^2, y la de 5x^4 es 20x^3.",
     "the power rule", "It is the rule that says the derivative of x^n is n x^(n-1). For example, the derivative of x^3 is 3x^2, and the derivative of 5x^4 is 20x^3."),
    ("integrals", "una integral indefinida", "Es el conjunto de funciones cuya derivada es la función dada; por eso se añade una constante C. Por ejemplo, ∫ 2x dx = x^2 + C, porque la derivada de x^2 es 2x.",
     "an indefinite integral", "It is the family of functions whose derivative is the given function, which is why a constant C is added. For example, ∫ 2x dx = x^2 + C, because the derivative of x^2 is 2x."),
    ("integrals", "una integral definida", "La integral de f entre a y b mide el área con signo bajo la gráfica de f. Se calcula con una primitiva F: es F(b) - F(a).",
     "a definite integral", "The integral of f from a to b measures the signed area under the graph of f. It is computed with an antiderivative F as F(b) - F(a)."),
    ("geometry", "el teorema de Pitágoras", "En un triángulo rectángulo, el cuadrado de la hipotenusa es igual a la suma de los cuadrados de los catetos: c^2 = a^2 + b^2. Por ejemplo, con catetos 3 y 4 la hipotenusa mide 5.",
     "the Pythagorean theorem", "In a right triangle, the square of the hypotenuse equals the sum of the squares of the legs: c^2 = a^2 + b^2. For example, with legs 3 and 4 the hypotenuse is 5."),
    ("geometry", "el perímetro", "El perímetro de una figura es la longitud de su borde, es decir, la suma de sus lados. Un rectángulo de lados 3 y 5 tiene perímetro 2 × (3 + 5) = 16.",
     "the perimeter", "The perimeter of a shape is the length of its boundary, that is, the sum of its sides. A rectangle with sides 3 and 5 has perimeter 2 × (3 + 5) = 16."),
    ("probability", "la probabilidad", "La probabilidad mide lo posible que es un suceso, con un número entre 0 y 1. Si todos los casos son igual de probables, es casos favorables entre casos posibles: sacar un 6 con un dado tiene probabilidad 1/6.",
     "probability", "Probability measures how likely an event is, with a number between 0 and 1. If all outcomes are equally likely, it is favorable outcomes divided by possible outcomes: rolling a 6 with a die has probability 1/6."),
    ("probability", "un suceso imposible", "Es un suceso que no puede ocurrir nunca, y su probabilidad es 0. Por ejemplo, sacar un 7 con un dado de seis caras.",
     "an impossible event", "It is an event that can never happen, so its probability is 0. For example, rolling a 7 with a six-sided die."),
    ("powers_roots", "una potencia", "Una potencia a^n es el producto de n factores iguales a a. La base es a y el exponente es n. Por ejemplo, 2^3 = 2 × 2 × 2 = 8.",
     "a power", "A power a^n is the product of n factors equal to a. The base is a and the exponent is n. For example, 2^3 = 2 × 2 × 2 = 8."),
    ("powers_roots", "una raíz cuadrada", "La raíz cuadrada de un número n es el número no negativo que, multiplicado por sí mismo, da n. Por ejemplo, √49 = 7 porque 7^2 = 49.",
     "a square root", "The square root of a number n is the non-negative number that gives n when multiplied by itself. For example, √49 = 7 because 7^2 = 49."),
    ("sequences", "una progresión aritmética", "Es una sucesión en la que cada término se obtiene sumando al anterior una cantidad fija d, la diferencia. Su término general es a_n = a_1 + (n - 1)d. Ejemplo: 2, 5, 8, 11, ...",
     "an arithmetic sequence", "It is a sequence where each term is the previous one plus a fixed amount d, the common difference. Its general term is a_n = a_1 + (n - 1)d. Example: 2, 5, 8, 11, ..."),
    ("sequences", "una progresión geométrica", "Es una sucesión en la que cada término se obtiene multiplicando el anterior por un número fijo r, la razón. Ejemplo: 3, 6, 12, 24, ... con razón 2.",
     "a geometric sequence", "It is a sequence where each term is the previous one times a fixed number r, the common ratio. Example: 3, 6, 12, 24, ... with ratio 2."),
]
CONCEPTS = {t: {"es": [(c[1], c[2]) for c in _CONCEPTS if c[0] == t], "en": [(c[3], c[4]) for c in _CONCEPTS if c[0] == t]}
            for t in TOPICS}

# --------------------------------------------------------------------------- records
SOLVERS: dict[str, tuple[Callable, Callable]] = {t: (globals()[f"sample_{t}"], globals()[f"solve_{t}"]) for t in TOPICS}
# Which parameters a "¿Y si fuera 9 en vez de 7?" follow-up may change (default: every int parameter).
VARY_ONLY = {("sequences", "terms"): ["n"], ("sequences", "geo"): [], ("sequences", "sum"): ["n"],
             ("probability", "coins"): []}


def render(pr: Problem, lang: str) -> str:
    return "\n".join(pr.steps + [L(lang, "La respuesta es ", "The answer is ") + f"\\boxed{{{pr.tex}}}."])


def problem_key(topic, lang, p):
    """Identity of a problem regardless of its phrasing: the same numbers are not asked twice per language."""
    return topic, lang, tuple(sorted((k, v) for k, v in p.items() if k != "tpl"))


def new_problem(rng, topic, lang, seen):
    """Sample until the problem is valid and has not been used yet."""
    sample, solve = SOLVERS[topic]
    for _ in range(1000):
        p = sample(rng)
        p["tpl"] = rng.randrange(12)
        pr = solve(p, lang)
        if pr is not None and problem_key(topic, lang, p) not in seen:
            seen.add(problem_key(topic, lang, p))
            return p, pr
    raise RuntimeError(f"could not sample a new {topic} problem")


def vary(rng, topic, lang, p, pr, seen):
    """Change one number that appears exactly once in the question, keeping the problem valid and new."""
    keys = VARY_ONLY.get((topic, p["kind"]), [k for k in sorted(p) if k not in ("kind", "tpl")])
    keys = [k for k in keys if p.get(k, 0) > 0 and len(re.findall(rf"(?<!\d){p[k]}(?!\d)", pr.question)) == 1]
    for _ in range(40 if keys else 0):
        k = rng.choice(keys)
        old = p[k]
        new = old + rng.choice([-3, -2, -1, 1, 2, 3] if old <= 12 else [-20, -10, 10, 20])
        if new < 1 or str(new) in pr.question:  # a number already in the question would be ambiguous
            continue
        p2 = dict(p, **{k: new})
        pr2 = SOLVERS[topic][1](p2, lang)
        if pr2 is not None and problem_key(topic, lang, p2) not in seen:
            seen.add(problem_key(topic, lang, p2))
            ask = rng.choice([L(lang, f"¿Y si fuera {new} en vez de {old}?", f"And if it were {new} instead of {old}?"),
                              L(lang, f"¿Y si en lugar de {old} fuera {new}?", f"What if it were {new} instead of {old}?")])
            return p2, pr2, ask
    return None


def double(rng, topic, lang, pr):
    """'And what is twice that?' - only for single numbers/expressions where doubling makes sense."""
    v = pr.value
    if topic == "probability" or isinstance(v, sp.FiniteSet) or C in v.free_symbols:
        return None
    shown = f"({plain(v)})" if isinstance(v, sp.Add) or (v.is_number and v < 0) else plain(v)
    v2 = sp.expand(2 * v)
    steps = [L(lang, "Multiplicamos por 2: ", "Multiply by 2: ") + f"2 × {shown} = {plain(v2)}."]
    ask = rng.choice([L(lang, "¿Y cuánto es el doble de ese resultado?", "And what is twice that?"),
                      L(lang, "¿Y el doble?", "What is double that result?")])
    return Problem(ask, steps, v2, sp.latex(v2))


def make_pair(rng, topic, lang, seen):
    _, pr = new_problem(rng, topic, lang, seen)
    rec = {"instruction": pr.question, "output": render(pr, lang)}
    roll = rng.random()
    if roll < 0.1:  # a minority in the "instruction + input" Alpaca variant
        rec = {"instruction": GENERIC_INSTRUCTION[lang], "input": pr.question, "output": rec["output"]}
    elif roll < 0.25:
        rec = {"system": SYSTEM[lang], **rec}
    return {**rec, "topic": topic, "lang": lang, "_answers": [pr.value]}


def concept_pairs(topic):
    out = []
    for lang in ("es", "en"):
        for name, text in CONCEPTS[topic][lang]:
            asks = (L(lang, "¿Qué es {}?", "What is {}?"), L(lang, "Explica brevemente qué es {}.", "Briefly explain what {} is."))
            for ask in asks:
                out.append({"instruction": ask.format(name), "output": text, "topic": topic, "lang": lang, "_answers": [None]})
    return out


def make_conversation(rng, topic, lang, seen, with_concept):
    msgs, answers = [], []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": SYSTEM[lang]})
    if with_concept:  # explanation first, then a worked problem on the same topic
        name, text = rng.choice(CONCEPTS[topic][lang])
        msgs += [{"role": "user", "content": L(lang, f"¿Qué es {name}?", f"What is {name}?")},
                 {"role": "assistant", "content": text}]
        answers.append(None)
    p, pr = new_problem(rng, topic, lang, seen)
    turns = [(pr.question, pr)]
    for _ in range(1 if with_concept else rng.choice([1, 2])):
        # mostly "what if it were 9 instead of 7", sometimes "and twice that"; each is the other's fallback
        changed = vary(rng, topic, lang, p, pr, seen) if rng.random() < 0.7 else None
        twice = None if changed else double(rng, topic, lang, pr)
        if not changed and not twice:
            changed = vary(rng, topic, lang, p, pr, seen)
        if changed:
            p, pr, ask = changed
            turns.append((ask, pr))
        elif twice:
            turns.append((twice.question, twice))
            break  # after doubling, "what if it were 9 instead of 7" would be ambiguous
        else:
            break
    for ask, t in turns:
        msgs += [{"role": "user", "content": ask}, {"role": "assistant", "content": render(t, lang)}]
        answers.append(t.value)
    if len(answers) < 2:
        return None
    return {"messages": msgs, "topic": topic, "lang": lang, "_answers": answers}


def generate_records(seed: int = 0) -> list[dict]:
    """All records, pairs first; each carries a private ``_answers`` list (see module docstring)."""
    rng = random.Random(seed)
    pairs, convs, seen = [], [], set()
    for topic in TOPICS:
        pairs += concept_pairs(topic)
        for i in range(WORKED_PAIRS_PER_TOPIC):
            pairs.append(make_pair(rng, topic, ("es", "en")[i % 2], seen))
        made = 0
        while made < CONVERSATIONS_PER_TOPIC:  # the first two (one per language) open with a concept question
            conv = make_conversation(rng, topic, ("es", "en")[made % 2], seen, with_concept=made < 2)
            if conv:
                convs.append(conv)
                made += 1
    rng.shuffle(pairs)  # mixed order, so a head-of-file subset still covers every topic
    rng.shuffle(convs)
    return pairs + convs


def write_files(out_dir: Path, seed: int = 0) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = generate_records(seed)
    paths = [out_dir / "pairs.jsonl", out_dir / "conversations.jsonl"]
    for path, is_conv in zip(paths, (False, True)):
        lines = [json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, ensure_ascii=False)
                 for r in records if ("messages" in r) == is_conv]
        path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_files(args.out, args.seed):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
