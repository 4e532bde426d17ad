"""Scored answers -> accuracies with 95% intervals, base vs fine-tuned paired, the printed table.

    topic        n  base                fine-tuned          change                    p
    arithmetic  12  8.3% [1.5-35.4]     41.7% [19.3-68.0]   +33.3 [+2.6, +56.8]    0.13
    gcd          4  0.0% [0.0-49.0]     50.0% [15.0-85.0]   n < 10, too few to compare
    all         35  2.9% [0.5-14.5]     20.0% [10.0-35.9]   +17.1 [+3.0, +32.5]   0.016

The input is what `evaluate.score` returns per example; intervals and the paired test come from
`confidence`. An accuracy counts every checkable example: an answer is correct, wrong, or
truncated (it hit the token limit before stating an answer), and the last two are counted apart
so that "the model is wrong" and "the answers are longer than max_new_tokens" are not confused.
Per-topic rows with fewer than MIN_COMPARE examples get intervals but no change: at n = 4 one
problem moves the accuracy by 25 points.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from mathtune.display import percent
from mathtune.eval.confidence import SIGNIFICANCE, compare, interval

MIN_COMPARE = 10
"""Examples a topic needs before its base vs fine-tuned change is shown."""


def summarize(examples, results: list[dict]) -> dict[str, Any]:
    """Accuracy overall and per topic over checkable examples; reference loss over the others."""
    by_topic: dict[str, list[dict]] = defaultdict(list)
    losses = []
    for example, result in zip(examples, results):
        if example.checkable:
            by_topic[example.topic].append(result)
        elif result.get("reference_loss") is not None:
            losses.append(result["reference_loss"])
    flat = [r for rows in by_topic.values() for r in rows]
    mean_loss = sum(losses) / len(losses) if losses else None
    return {
        **_counts(flat),
        "by_topic": {topic: _counts(rows) for topic, rows in sorted(by_topic.items())},
        "uncheckable": len(examples) - len(flat),
        "reference_loss": round(mean_loss, 6) if mean_loss is not None else None,
        "reference_perplexity": round(math.exp(mean_loss), 4) if mean_loss is not None else None,
    }


def _counts(results: list[dict]) -> dict[str, Any]:
    correct = sum(bool(r["correct"]) for r in results)
    truncated = sum(bool(r.get("truncated")) and not r["correct"] for r in results)
    return {"accuracy": round(correct / len(results), 4) if results else 0.0, "correct": correct,
            "checked": len(results), "interval": interval(correct, len(results)),
            "wrong": len(results) - correct - truncated, "truncated": truncated}


def paired_change(examples, base: list[dict], tuned: list[dict]) -> dict[str, Any]:
    """Fine-tuned minus base on the same checkable examples: overall and per topic (not below
    MIN_COMPARE examples), each with its paired interval and McNemar's exact p-value."""
    pairs: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for example, b, t in zip(examples, base, tuned):
        if example.checkable:
            pairs[example.topic].append((bool(b["correct"]), bool(t["correct"])))

    def change(rows: list[tuple[bool, bool]]) -> dict[str, Any]:
        result = compare([b for b, _ in rows], [t for _, t in rows])
        return {**result, "significant": result["p_value"] < SIGNIFICANCE}

    flat = [row for rows in pairs.values() for row in rows]
    return {**change(flat), "by_topic": {
        topic: change(rows) if len(rows) >= MIN_COMPARE else {"too_small": True, "checked": len(rows)}
        for topic, rows in sorted(pairs.items())}}


def significant_drop(summary: dict, what: str) -> str | None:
    """A warning when the fine-tuned model is worse than the base and the paired test says the
    drop is real; None otherwise."""
    change = summary.get("change")
    if not change or not change.get("significant") or change["difference"] >= 0:
        return None
    models = summary["models"]
    return (f"Fine-tuning made the model worse on {what}: {percent(models['base']['accuracy'])} -> "
            f"{percent(models['finetuned']['accuracy'])} ({_points(change)}, McNemar exact p "
            f"{'< 0.001' if change['p_value'] < 0.001 else '= ' + p_text(change['p_value'])}, "
            f"{models['finetuned']['checked']} problems). Narrow fine-tuning can cost general "
            "ability: fewer steps, a lower learning rate or mixing in general math data usually help.")


# ---------------------------------------------------------------------------------------------
# The printed table


def comparison_table(summary: dict) -> str:
    """Accuracy per topic with intervals, base and fine-tuned (when both were scored), the paired
    change with its interval and p-value, the answer counts and the protocol."""
    models = summary["models"]
    names = [name for name in ("base", "finetuned") if name in models]
    change = summary.get("change")
    labels = {"base": summary.get("base_label", "base"), "finetuned": summary.get("finetuned_label", "fine-tuned")}
    header = ["topic", "n", *(labels[name] for name in names)]
    if change:
        header += ["change (points)", "p"]
    rows = [header]
    first = models[names[0]]
    for topic in [*first["by_topic"], "all"]:
        cells = [topic, str(topic_row(first, topic)["checked"])]
        cells += [accuracy_text(topic_row(models[name], topic)) for name in names]
        if change:
            c = topic_row(change, topic)
            cells += [f"n < {MIN_COMPARE}, too few" if c.get("too_small") else _points(c),
                      "" if c.get("too_small") else p_text(c["p_value"])]
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("95% intervals: Wilson (accuracy)" + (", Newcombe paired (change); p: McNemar exact test on the "
                                                      "same problems" if change else "") + ".")
    for name in names:
        m = models[name]
        label = labels[name]
        lines.append(f"{label}: {m['correct']} correct, {m['wrong']} wrong, {m['truncated']} truncated (hit the "
                     "token limit without an answer)")
    tuned = models.get("finetuned") or first
    if tuned["uncheckable"]:
        loss = ", ".join(f"{'fine-tuned' if n == 'finetuned' else n} {models[n]['reference_loss']}" for n in reversed(names))
        lines.append(f"{tuned['uncheckable']} examples without a checkable answer: reference loss per token {loss}")
    if "protocol" in summary:
        lines.append(protocol_text(summary["protocol"]))
    return "\n".join(lines)


def protocol_text(protocol: dict) -> str:
    """One paragraph saying how the scores were obtained: published math scores for one model
    differ by 20-30 points between prompts, decoding and answer extraction."""
    return (f"Protocol: {protocol['prompt']}; {protocol['decoding']}, at most {protocol['max_new_tokens']} new tokens, "
            f"stop at {', '.join(protocol['stop_tokens'])}; verified by {protocol['verifier']}.")


def topic_row(scores: dict, topic: str) -> dict:
    """A model's (or the change's) entry for one topic, or its overall one for "all"."""
    return scores if topic == "all" else scores["by_topic"][topic]


def accuracy_text(m: dict) -> str:
    """'20.0% [10.0-35.9]': accuracy and its 95% interval, in percent."""
    return f"{percent(m['accuracy'])} [{100 * m['interval']['low']:.1f}-{100 * m['interval']['high']:.1f}]"


def _points(c: dict) -> str:
    return f"{100 * c['difference']:+.1f} [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}]"


def p_text(p: float) -> str:
    """A p-value as the tables show it: '<0.001', '0.031', '0.50'."""
    return "<0.001" if p < 0.001 else f"{p:.3f}" if p < 0.1 else f"{p:.2f}"
