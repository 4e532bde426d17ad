"""accuracy.py: counts, intervals, the paired change per topic, the drop warning, the printed table."""

from __future__ import annotations

import pytest

from mathtune.eval.accuracy import MIN_COMPARE, comparison_table, paired_change, significant_drop, summarize
from mathtune.eval.evaluate import EvalExample

PROTOCOL = {"prompt": "the model's chat template, no system prompt, zero-shot", "decoding": "greedy",
            "max_new_tokens": 96, "stop_tokens": ["<|im_end|>"], "verifier": "math-verify 0.9.0"}


def _examples(topics: dict[str, int]) -> list[EvalExample]:
    return [EvalExample([{"role": "user", "content": f"{t} {i}"}], f"#### {i}", t, True)
            for t, n in topics.items() for i in range(n)]


def _results(correct: list[bool], truncated: list[bool] | None = None) -> list[dict]:
    truncated = truncated or [False] * len(correct)
    return [{"correct": c, "truncated": t} for c, t in zip(correct, truncated)]


def test_accuracy_counts_only_checkable_examples_overall_and_per_topic():
    examples = [EvalExample([], "\\boxed{1}", "a", True), EvalExample([], "\\boxed{2}", "a", True),
                EvalExample([], "\\boxed{3}", "b", True), EvalExample([], "explanation", "b", False)]
    results = [{"correct": True}, {"correct": False, "truncated": True}, {"correct": True}, {"reference_loss": 1.0}]
    summary = summarize(examples, results)
    assert (summary["accuracy"], summary["correct"], summary["checked"]) == (0.6667, 2, 3)
    assert (summary["wrong"], summary["truncated"]) == (0, 1)  # the one that hit the limit is not "wrong"
    assert summary["interval"] == {"low": 0.2077, "high": 0.9385}
    assert summary["by_topic"]["a"] == {"accuracy": 0.5, "correct": 1, "checked": 2, "wrong": 0, "truncated": 1,
                                        "interval": {"low": 0.0945, "high": 0.9055}}
    assert summary["by_topic"]["b"]["interval"] == {"low": 0.2065, "high": 1.0}
    assert summary["uncheckable"] == 1 and summary["reference_loss"] == 1.0
    assert summary["reference_perplexity"] == pytest.approx(2.7183, abs=1e-4)


def test_topics_under_ten_problems_are_too_small_to_compare():
    examples = _examples({"arithmetic": 12, "gcd": 4})
    base = _results([False] * 16)
    tuned = _results([True] * 6 + [False] * 6 + [True] * 4)
    change = paired_change(examples, base, tuned)
    assert change["by_topic"]["gcd"] == {"too_small": True, "checked": 4}
    arithmetic = change["by_topic"]["arithmetic"]
    assert (arithmetic["difference"], arithmetic["only_tuned"], arithmetic["only_base"]) == (0.5, 6, 0)
    assert arithmetic["p_value"] == 0.0312 and arithmetic["significant"]  # 2 / 2^6
    assert change["difference"] == 0.625 and change["p_value"] == 0.002 and change["significant"]
    assert MIN_COMPARE == 10

    summary = {"protocol": PROTOCOL, "change": change,
               "models": {"base": summarize(examples, base), "finetuned": summarize(examples, tuned)}}
    table = comparison_table(summary)
    lines = {line.split()[0]: line for line in table.splitlines()}
    assert "n < 10, too few" in lines["gcd"] and "100.0% [51.0-100.0]" in lines["gcd"]
    assert "+50.0 [+" in lines["arithmetic"] and lines["arithmetic"].endswith("0.031")
    assert "0.0% [0.0-19.4]" in lines["all"] and "62.5% [38.6-81.5]" in lines["all"]
    assert lines["all"].endswith("0.002")  # 2 / 2^10
    assert "fine-tuned: 10 correct, 6 wrong, 0 truncated (hit the token limit without an answer)" in table
    assert ("Protocol: the model's chat template, no system prompt, zero-shot; greedy, at most 96 new tokens, stop at "
            "<|im_end|>; verified by math-verify 0.9.0.") in table


def test_only_a_significant_drop_is_warned_about():
    examples = _examples({"arithmetic": 40})
    base = _results([True] * 30 + [False] * 10)

    def summary(tuned):
        return {"models": {"base": summarize(examples, base), "finetuned": summarize(examples, tuned)},
                "change": paired_change(examples, base, tuned)}

    drop = summary(_results([True] * 15 + [False] * 25))
    warning = significant_drop(drop, "gsm8k")
    assert warning.startswith("Fine-tuning made the model worse on gsm8k: 75.0% -> 37.5% (-37.5 [")
    assert "McNemar exact p < 0.001, 40 problems" in warning
    assert significant_drop(summary(_results([True] * 28 + [False] * 12)), "gsm8k") is None  # -5 points: noise
    assert significant_drop(summary(_results([True] * 40)), "gsm8k") is None  # a significant gain
    assert significant_drop({"models": drop["models"], "change": None}, "gsm8k") is None  # one model only


def test_table_of_one_model_has_no_change_column():
    examples = _examples({"arithmetic": 3})
    table = comparison_table({"models": {"finetuned": summarize(examples, _results([True, False, False]))}})
    assert table.splitlines()[0].split() == ["topic", "n", "fine-tuned"]
    assert "33.3% [6.2-79.2]" in table and "change" not in table
