"""Which math topic a problem is about, and which language it is in (English or Spanish).

    >>> detect_topic("Calcula la derivada de f(x) = 3x^2.")
    'derivatives'
    >>> detect_topic("¿Cuál es el MÁXIMO COMUN DIVISOR de 12 y 18?")
    'divisibility'

Used by `mathtune data stats` (the topics table) and by `mathtune eval` (the per-topic accuracy of
records that carry no "topic" field). A record's own "topic" field always wins over detection.

How it works: the text is lowercased and its accents removed ("Fracción" -> "fraccion"), so the
patterns below match whatever the case and accents. Each topic has a list of (pattern, weight):
strong words that name the topic ("derivative", "derivada", "integral", "∫", "porcentaje", "%")
weigh 3, words that point to it (dice, area, hypotenuse) 2, and shapes of notation that suggest
it ("3/4", "x^2 ... = ", "12 + 7") 1. A topic's score is the sum of the weights of its patterns found
in the user's turns, plus a quarter of that from the assistant's turns (answers repeat the topic's
vocabulary, but a follow-up question such as "and if it were 5?" names nothing). The primary topic
is the highest score; ties go to the topic listed first in TOPICS (the more specific one); no match
at all is "other". Labels are those of the bundled dataset, plus statistics, trigonometry,
logarithms and matrices.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

OTHER = "other"

# Order matters for ties: specific topics first, arithmetic (the most generic) last.
_RULES: dict[str, list[tuple[str, float]]] = {
    "derivatives": [
        (r"\bderivad|\bderivative|\bderivar?\b|\bdifferentiat|\bderiva\b", 3),
        (r"\bf'\s*\(|\bd/dx|\bdy/dx|regla de la cadena|chain rule|recta tangente|tangent line|rate of change|"
         r"tasa de cambio", 2),
        (r"power rule|regla de la potencia", 4),  # outweighs "power"/"potencia" of powers_roots
    ],
    "integrals": [
        (r"∫|\bintegra(l|te|tion|cion|r)?\b|\bintegrales\b|antiderivative|antiderivada|\bprimitiva", 3),
        (r"area under|area bajo", 2),
    ],
    "matrices": [
        (r"\bmatri(x|z|ces)\b|\bdeterminant|eigen|autovalor|valor(es)? propio|\btranspos|\btraspuest", 3),
        (r"\bvector(es|s)?\b|dot product|producto escalar|cross product|producto vectorial", 2),
    ],
    "logarithms": [
        (r"\blogarit|\blog\s*(_|\(|\d|base\b)|\bln\s*(\(|\d|x\b)", 3),  # not "logs" of wood
        (r"exponential equation|ecuacion exponencial|\be\^", 2),
    ],
    "trigonometry": [
        (r"trigonometr|\b(sin|cos|tan|sen|sec|csc|cot)\s*\(?\s*(\d|x|θ|α|π|\\pi|\\theta)|\bseno\b|\bcoseno\b|"
         r"\btangente de\b|\bradian", 3),
        (r"\b(angle|angulo)s?\b|θ|\\theta", 1),  # "degrees" alone is more often a temperature
    ],
    "quadratics": [
        (r"quadratic|cuadratica|second degree|segundo grado|discriminant|discriminante|"
         r"completing the square|completar (el )?cuadrado|\bparabola|\bvertex\b|\bvertice\b", 3),
        (r"x\s*(\^\s*2|²)[^=\n]*=", 2),
    ],
    "linear_equations": [
        (r"linear equation|ecuacion(es)? lineal|ecuacion de primer grado|system of equations|"
         r"sistema de ecuaciones|solve for [a-z]\b|despeja", 3),
        (r"\b(find|halla|encuentra|calcula)( el valor de)? x\b|\bvalor de x\b|\bequation\b|\becuacion\b|"
         r"\bunknown\b|\bincognita\b", 2),
        (r"\d\s*\(?\s*x\s*[-+)][^=\n^²]*=\s*-?\d", 1),
    ],
    "probability": [
        (r"probabilit|probabilidad|\bat random\b|\bal azar\b|\bodds\b|likely|\bsuceso|\bevento aleatorio", 3),
        (r"\bdic?e\b|\bdados?\b|\bcoins?\b|\bmonedas?\b|\burn\b|\burna\b|\bcards?\b|\bcartas\b|\bbaraja|"
         r"heads|tails|combinations|combinaciones|permutation|permutacion|\bfavorab", 2),
    ],
    "statistics": [
        (r"\bmean\b|\baverage\b|\bpromedio\b|\bmedian\b|\bmediana\b|standard deviation|desviacion (tipica|estandar)|"
         r"\bvariance\b|\bvarianza\b|estadistic|statistic", 3),
        (r"\bmedia\b|\bmode\b|\bmoda\b|frequency|frecuencia|data set|conjunto de datos|\bsample\b|\bmuestra\b", 2),
    ],
    "sequences": [
        (r"\bsequence|\bsucesion|progresion|progression|\bseries\b|\bserie\b|fibonacci|next term|"
         r"siguiente termino|\bn-?th term|termino general|enesimo", 3),
        (r"\ba_\{?(\d+|n)|common (difference|ratio)|diferencia comun|\brazon\b|sum of the (whole|natural|first)|"
         r"suma de los (numeros|primeros)|\bterm(ino)? (number|numero)", 2),
        (r"\d+\s*,\s*\d+\s*,\s*\d+\s*,\s*\d+\s*,\s*(\.\.\.|…)", 2),
        (r"[-+]\s*(\.\.\.|…|\\cdots|\\ldots)\s*[-+]", 3),  # 1 + 2 + ... + 40
    ],
    "geometry": [
        (r"\bareas?\b|\bperimet|\bperimeter|pythag|pitagoras|hypotenuse|hipotenusa|\bvolumen?\b|geometr", 3),
        (r"rectang|triang|\bcircle|\bcirculo|circumference|circunferencia|\bradius|\bradio\b|diamet|"
         r"\bpolygon|\bpoligono|\bsphere|\besfera|cylinder|cilindro|\bcatetos?\b|\blegs\b|\bsides?\b|\blados?\b|"
         r"\bheight\b|\baltura\b|\bwidth\b|\bprism|\bprisma|\bsquare meters|metros cuadrados", 2),
        (r"π|\\pi\b", 1),
    ],
    "divisibility": [
        (r"\bgcd\b|\blcm\b|\bmcd\b|\bmcm\b|\bhcf\b|greatest common (divisor|factor)|least common multiple|"
         r"maximo comun divisor|minimo comun multiplo|\bprimes?\b|\bprimos?\b|divisib", 3),
        (r"\bdivisors?\b|\bdivisor(es)?\b|\bmultiples? of\b|\bmultiplos? de\b|remainder when|"
         r"resto de (la )?division|prime factor|factori[sz]ation|factorizacion|\bfactors\b|\bfactores\b", 2),
    ],
    "percentages": [
        (r"%|\bpercent|\bporcentaje|por ciento|porcentual", 3),
        (r"discount|descuento|\binterest\b|\binteres\b|\btax\b|\bimpuesto|\biva\b|\brebaja", 2),
    ],
    "powers_roots": [
        (r"√|∛|square root|cube root|raiz|raices|\bsqrt|\\sqrt|\bsquared\b|\bcubed\b|al cuadrado|al cubo|"
         r"exponent|\bpotencias?\b|\bpowers?\b", 3),
        (r"(the )?square of|(the )?cube of|el cuadrado de|el cubo de", 2),
        (r"\d\s*(\^|\*\*)\s*\d", 2),
    ],
    "fractions": [
        (r"\bfraction|\bfraccion|lowest terms|simplest form|forma mas simple|irreducible|numerator|denominator|"
         r"numerador|denominador", 3),
        (r"(?<![\d/])\d+\s*/\s*\d+(?![\d/])|\\frac", 1),
        (r"\bhalf\b|\bthirds?\b|\bquarters?\b|\bmitad\b|\btercio|\bcuarto\b", 0.5),
    ],
    "arithmetic": [
        (r"commutative|conmutativa|associative|asociativa|order of operations|orden de las operaciones|"
         r"aritmetic|arithmetic", 3),
        (r"\d\s*[-+×x*÷·]\s*\d|\bmultipl(y|ica)|\bdivid|\badd\b|\bsubtract|\bsuma\b|\bresta\b|\bproduct\b|"
         r"\bproducto\b|\bsum of\b|how (many|much)|cuant[oa]s?\b|\btotal\b|\$\s*\d|\beuros?\b|\bdollars?\b", 1),
    ],
}

TOPICS: tuple[str, ...] = tuple(_RULES)
"""The labels the detector can give, most specific first; 'other' when nothing matches."""

_COMPILED = [(topic, [(re.compile(p), w) for p, w in rules]) for topic, rules in _RULES.items()]
_ANSWER_WEIGHT = 0.25
_CALCULATOR = re.compile(r"<<[^<>\n]*>>")  # GSM8K's "<<48/2=24>>" annotations are not fractions


def normalize(text: str) -> str:
    """Lowercase, accents removed ("Fracción" -> "fraccion"); math symbols (∫ √ π %) are kept."""
    # NFKD would turn "x²" into "x2"; spell superscript powers out first.
    text = text.lower().replace("²", "^2").replace("³", "^3")
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def topic_scores(question: str, answer: str = "") -> dict[str, float]:
    """Score of every topic with a match: question patterns count fully, answer patterns a quarter."""
    scores: dict[str, float] = {}
    answer = _CALCULATOR.sub("", answer)
    for text, factor in ((normalize(question), 1.0), (normalize(answer), _ANSWER_WEIGHT)):
        if not text:
            continue
        for topic, rules in _COMPILED:
            points = sum(weight for pattern, weight in rules if pattern.search(text))
            if points:
                scores[topic] = scores.get(topic, 0.0) + factor * points
    return scores


def detect_topic(question: str, answer: str = "") -> str:
    """The primary topic of a problem (its user text, optionally its answer), or 'other'."""
    scores = topic_scores(question, answer)
    if not scores:
        return OTHER
    best = max(scores.values())
    return next(t for t in TOPICS if scores.get(t) == best)


def conversation_topic(messages: Iterable[dict[str, str]]) -> str:
    """The primary topic of a conversation: detected from all its user turns and its answers."""
    messages = list(messages)
    question = "\n".join(m["content"] for m in messages if m["role"] == "user")
    answer = "\n".join(m["content"] for m in messages if m["role"] == "assistant")
    return detect_topic(question, answer)


def record_topic(topic: str | None, messages: Iterable[dict[str, str]]) -> str:
    """The record's own topic field when it has one, else the detected one."""
    return topic if topic else conversation_topic(messages)


# ---------------------------------------------------------------------------------------------
# Language: English or Spanish, from frequent short words and Spanish-only letters.

_SPANISH = re.compile(
    r"[¿¡ñ]|\b(el|la|los|las|de|del|que|es|un|una|por|para|cual|cuanto|cuantos|calcula|halla|resuelve|"
    r"y|con|en|se|su|al|si|entre|sobre|tiene|cuesta|hay|como|mas|respuesta|numero)\b"
)
_ENGLISH = re.compile(
    r"\b(the|of|is|what|find|compute|calculate|solve|and|to|a|an|with|in|if|how|many|much|has|are|"
    r"does|each|she|he|they|his|her|answer|number|from|for)\b"
)


def detect_language(text: str) -> str:
    """'es', 'en', or 'unknown' when neither vocabulary appears (formulas only)."""
    normalized = text.lower()  # accents kept: "¿", "ñ" are evidence
    spanish = len(_SPANISH.findall(normalized))
    english = len(_ENGLISH.findall(normalized))
    if spanish == english == 0:
        return "unknown"
    return "es" if spanish > english else "en"
