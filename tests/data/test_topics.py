"""Topic and language detection: labelled sentences in English and Spanish, and the bundled dataset."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from mathtune.data.builtin import builtin_files
from mathtune.data.formats import detect_format, parse_record
from mathtune.data.topics import OTHER, TOPICS, conversation_topic, detect_language, detect_topic, record_topic

# Written for this test (not taken from the bundled dataset), several phrasings per topic.
LABELLED = [
    ("What is 347 + 589?", "arithmetic"),
    ("Multiplica 23 por 41.", "arithmetic"),
    ("¿Cuánto es 1200 ÷ 16?", "arithmetic"),
    ("Add 3/5 and 1/4, and give the result as a fraction.", "fractions"),
    ("Simplifica la fracción 18/24.", "fractions"),
    ("Escribe 12/20 como fracción irreducible.", "fractions"),
    ("What is 15% of 80?", "percentages"),
    ("Un abrigo de 90 euros tiene una rebaja del 20 por ciento. ¿Cuánto cuesta?", "percentages"),
    ("¿Qué porcentaje de 50 es 12?", "percentages"),
    ("Find the square root of 196.", "powers_roots"),
    ("Calcula la raíz cúbica de 27.", "powers_roots"),
    ("What is 2 to the power of 10?", "powers_roots"),
    ("Halla el máximo común divisor de 84 y 36.", "divisibility"),
    ("Is 91 a prime number?", "divisibility"),
    ("Calcula el MÍNIMO COMÚN MÚLTIPLO de 6 y 15.", "divisibility"),
    ("Solve for x: 7x - 4 = 24.", "linear_equations"),
    ("Resuelve la ecuación 3(x + 2) = 21.", "linear_equations"),
    ("Despeja x en 5x + 10 = 0.", "linear_equations"),
    ("Solve the quadratic equation x^2 - 5x + 6 = 0.", "quadratics"),
    ("Resuelve x² + 2x - 8 = 0.", "quadratics"),
    ("Calcula el discriminante de 2x^2 + 3x + 1.", "quadratics"),
    ("What is the 10th term of the arithmetic sequence 3, 7, 11, 15, ...?", "sequences"),
    ("Halla la suma de los 20 primeros términos de la progresión geométrica de razón 2.", "sequences"),
    ("Continúa la sucesión de Fibonacci: 1, 1, 2, 3, 5, ...", "sequences"),
    ("Find the area of a circle with radius 6 cm.", "geometry"),
    ("Calcula el perímetro de un triángulo equilátero de lado 9.", "geometry"),
    ("El volumen de un cilindro de radio 2 y altura 5, ¿cuál es?", "geometry"),
    ("Two coins are tossed. What is the probability of getting two heads?", "probability"),
    ("Se lanza un dado. ¿Cuál es la PROBABILIDAD de sacar un número par?", "probability"),
    ("De una baraja de 40 cartas se saca una al azar. ¿Qué probabilidad hay de que sea un as?", "probability"),
    ("Differentiate g(x) = x^3 - 4x.", "derivatives"),
    ("Calcula la derivada de sen(x) · x^2.", "derivatives"),
    ("Halla la pendiente de la recta tangente a y = x^2 en x = 3 usando la derivada.", "derivatives"),
    ("Evaluate the integral of 2x from 0 to 4.", "integrals"),
    ("Calcula ∫ (3x^2 + 1) dx.", "integrals"),
    ("Halla una primitiva de 4x^3.", "integrals"),
    ("Find the mean and the median of 4, 8, 15, 16, 23, 42.", "statistics"),
    ("Calcula la desviación típica de los datos 2, 4, 4, 5.", "statistics"),
    ("What is sin(30°) + cos(60°)?", "trigonometry"),
    ("Calcula el coseno de un ángulo de π/3 radianes.", "trigonometry"),
    ("Solve log_2(x) = 5.", "logarithms"),
    ("Calcula el logaritmo en base 10 de 1000.", "logarithms"),
    ("Find the determinant of the matrix [[1, 2], [3, 4]].", "matrices"),
    ("Calcula la matriz inversa de A.", "matrices"),
]


@pytest.mark.parametrize("sentence,topic", LABELLED)
def test_labelled_sentences_get_their_topic(sentence, topic):
    assert detect_topic(sentence) == topic


def test_the_labelled_set_covers_both_languages_and_every_bundled_topic():
    assert len(LABELLED) >= 30
    spanish = sum(detect_language(s) == "es" for s, _ in LABELLED)
    assert spanish >= 15 and len(LABELLED) - spanish >= 15
    assert {t for _, t in LABELLED} == set(TOPICS) and len(TOPICS) >= 12


@pytest.mark.parametrize("variant", ["fracción", "FRACCIÓN", "fraccion", "Fraccion", "FrAcCiOn"])
def test_accents_and_case_do_not_matter(variant):
    assert detect_topic(f"Simplifica la {variant} 6/9.") == "fractions"
    assert detect_topic("ECUACIÓN DE SEGUNDO GRADO") == detect_topic("ecuacion de segundo grado") == "quadratics"


def test_text_without_math_vocabulary_is_other():
    assert detect_topic("Hola, ¿qué tal?") == OTHER
    assert detect_topic("") == OTHER


def test_the_answer_decides_when_the_question_names_nothing():
    # A follow-up such as "And if it were 5?" names nothing; the answer's vocabulary counts (a quarter).
    assert detect_topic("¿Y si fuera 5?", "Derivamos: la derivada es 10x.") == "derivatives"
    # ...but never outweighs what the question says.
    assert detect_topic("What is 20% of 50?", "Half of 20 is 10 and the fraction 1/5 of 50 is 10.") == "percentages"


def test_a_record_topic_field_wins_over_detection():
    messages = [{"role": "user", "content": "Integrate 2x."}, {"role": "assistant", "content": "x^2 + C"}]
    assert record_topic("calculus", messages) == "calculus"
    assert record_topic(None, messages) == "integrals"


def _bundled():
    for path in builtin_files():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            yield record, parse_record(record, detect_format(record))


def test_detector_agrees_with_the_bundled_labels():
    """Measured: 816 of 816 records (100%); the bar leaves room for phrasing changes in the generator."""
    results = Counter()
    for record, conv in _bundled():
        results[conversation_topic(conv.messages) == record["topic"]] += 1
    agreement = results[True] / sum(results.values())
    assert agreement >= 0.95, results


def test_language_detection_agrees_with_the_bundled_labels():
    pairs = [(record["lang"], detect_language("\n".join(m["content"] for m in conv.messages if m["role"] != "system")))
             for record, conv in _bundled()]
    assert sum(a == b for a, b in pairs) / len(pairs) >= 0.98
    assert detect_language("x^2 = 4") == "unknown"
