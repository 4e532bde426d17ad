"""How sure is an accuracy figure? 95% intervals and a paired test for base vs fine-tuned.

    >>> wilson(7, 35)                                   # 20.0% of 35 problems: 10.0% to 35.9%
    (0.1004..., 0.3589...)
    >>> compare(base=[True, False, False], tuned=[True, True, True])
    {'difference': 0.6667, 'low': -0.0586, 'high': 0.9385, 'p_value': 0.5, 'only_base': 0, 'only_tuned': 2}

An accuracy on a few dozen problems is uncertain by 10-20 points, and a change between two models
scored on the same problems must be judged on those same problems: most problems are answered
alike by both, and only the ones where they differ (the discordant pairs) say which is better.

- One accuracy: the Wilson score interval (Wilson 1927). Unlike the textbook p ± 1.96·SE it stays
  inside [0, 1] and keeps close to 95% coverage at 0/n, n/n and small n (Newcombe 1998,
  Stat Med 17:857, method 3; Brown, Cai & DasGupta 2001).
- The change, paired: Newcombe's square-and-add interval for the difference of paired proportions
  (Newcombe 1998, Stat Med 17:2635, method 10). It combines the two Wilson intervals and corrects
  for the correlation between the two models' answers (phi, with Newcombe's continuity correction).
  Chosen over the Wald interval for paired data, which overshoots [-1, 1] and undercovers at the
  small n and extreme accuracies of a 135M model (0-20%), and over Tango's score interval, which
  needs an iterative root search; Fagerland, Lydersen & Laake (2014, Stat Med 33:2850) recommend it
  among the closed-form intervals.
- Is the change real? McNemar's exact test: under "no difference" each discordant problem is a
  fair coin, so the two-sided p-value is a binomial tail over the discordant pairs (math.comb,
  exact at any n). Conservative at small n, and never claims a change from a handful of problems.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054
"""The normal quantile of a two-sided 95% interval."""

SIGNIFICANCE = 0.05
"""p-value under which a change is called significant."""


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of `correct` successes in `n` trials; (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_paired(both: int, only_first: int, only_second: int, neither: int,
                    z: float = Z95) -> tuple[float, float, float]:
    """(difference, low, high) for p(first) - p(second), both measured on the same n items.

    The cells of the paired 2x2 table: items both got right, only the first, only the second,
    neither (Fagerland et al.'s n11, n12, n21, n22).
    """
    n = both + only_first + only_second + neither
    if n == 0:
        return 0.0, -1.0, 1.0
    first, second = (both + only_first) / n, (both + only_second) / n
    l1, u1 = wilson(both + only_first, n, z)
    l2, u2 = wilson(both + only_second, n, z)
    margins = (both + only_first) * (only_second + neither) * (both + only_second) * (only_first + neither)
    phi = 0.0
    if margins:
        # Newcombe's continuity-corrected correlation: a positive one is shrunk by n/2 (to 0 at
        # most), a negative one kept, so the interval errs on the wide side.
        cross = both * neither - only_first * only_second
        if cross > n / 2:
            phi = (cross - n / 2) / math.sqrt(margins)
        elif cross < 0:
            phi = cross / math.sqrt(margins)
    d_low1, d_high1, d_low2, d_high2 = first - l1, u1 - first, second - l2, u2 - second
    diff = first - second
    low = diff - math.sqrt(max(0.0, d_low1**2 + d_high2**2 - 2 * phi * d_low1 * d_high2))
    high = diff + math.sqrt(max(0.0, d_low2**2 + d_high1**2 - 2 * phi * d_low2 * d_high1))
    return diff, max(-1.0, low), min(1.0, high)


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact p-value that two models are equally good, from their discordant pairs."""
    discordant = only_first + only_second
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(only_first, only_second) + 1))
    return min(1.0, 2 * tail / 2**discordant)


def compare(base: list[bool], tuned: list[bool]) -> dict[str, float | int]:
    """Fine-tuned minus base accuracy on the same problems: the difference, its 95% interval
    (Newcombe, paired), McNemar's exact p-value and the discordant counts."""
    if len(base) != len(tuned):
        raise ValueError(f"paired results of different lengths: {len(base)} base, {len(tuned)} fine-tuned")
    both = sum(b and t for b, t in zip(base, tuned))
    only_tuned = sum(t and not b for b, t in zip(base, tuned))
    only_base = sum(b and not t for b, t in zip(base, tuned))
    neither = len(base) - both - only_tuned - only_base
    diff, low, high = newcombe_paired(both, only_tuned, only_base, neither)
    return {"difference": round(diff, 4), "low": round(low, 4), "high": round(high, 4),
            "p_value": round(mcnemar_exact(only_tuned, only_base), 4), "only_base": only_base,
            "only_tuned": only_tuned}


def interval(correct: int, n: int) -> dict[str, float]:
    """The Wilson interval as summary.json holds it."""
    low, high = wilson(correct, n)
    return {"low": round(low, 4), "high": round(high, 4)}
