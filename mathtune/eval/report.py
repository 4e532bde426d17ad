"""One self-contained HTML page per run: what was trained, how the loss moved, what the model got right.

    mathtune report RUN_DIR

Reads only the run folder (config.yaml, train_summary.json, metrics.jsonl, eval/summary.json,
eval/predictions.jsonl, bench/*/summary.json) and writes RUN_DIR/plots/loss.png,
RUN_DIR/plots/accuracy.png (bench-NAME.png per benchmark) and RUN_DIR/report.html. The page
embeds the plots as data URIs and has no external CSS, scripts or fonts, so it opens from file://
and can be mailed as one file. The same inputs give the same bytes.
"""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path
from typing import Any

from mathtune.display import png, pyplot
from mathtune.errors import MathtuneError
from mathtune.eval.accuracy import MIN_COMPARE, accuracy_text, p_text, protocol_text, significant_drop, topic_row
from mathtune.files import write_bytes, write_text
from mathtune.run import BENCH, CONFIG, EVAL, METRICS, PLOTS, REPORT, SUMMARY, require_run_dir

SAMPLES = 4
"""Fine-tuned answers shown of each kind (correct, wrong): the first ones in predictions.jsonl."""

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; max-width: 1150px;
       margin: 2em auto; padding: 0 1em; }
h1 { margin-bottom: 0.1em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.muted { color: #777; } .note { background: #fff7e0; border-left: 4px solid #e0a800; padding: 0.5em 0.8em; }
table { border-collapse: collapse; margin: 0.6em 0; } th, td { padding: 0.25em 0.8em; border-bottom: 1px solid #eee; }
th { text-align: left; background: #f6f6f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.all td { font-weight: 600; border-top: 2px solid #ccc; }
.up { color: #17803d; } .down { color: #c0392b; } .small { color: #777; font-style: italic; }
.warning { border-left-color: #c0392b; background: #fdecea; } .protocol { font-size: 13px; color: #555; }
img { max-width: 100%; }
code, pre, .response { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }
pre, .response { white-space: pre-wrap; word-break: break-word; margin: 0; }
.sample { border: 1px solid #ddd; border-radius: 6px; margin: 1em 0; overflow: hidden; }
.sample h3 { margin: 0; padding: 0.4em 0.8em; font-size: 14px; background: #f6f6f6; }
.cols { display: grid; grid-template-columns: repeat(auto-fit, minmax(220px, 1fr)); }
.cols > div { padding: 0.5em 0.8em; border-left: 1px solid #eee; } .cols > div:first-child { border-left: 0; }
.label { font-size: 12px; text-transform: uppercase; letter-spacing: 0.04em; color: #777; margin-bottom: 0.3em; }
.answer { margin-top: 0.5em; font-size: 13px; } .ok { color: #17803d; } .bad { color: #c0392b; }
details pre { background: #f8f8f8; padding: 0.8em; }
"""


def write_report(run_dir: Path) -> Path:
    """Write RUN_DIR/plots/*.png and RUN_DIR/report.html from the run folder's files; return the page."""
    run_dir = Path(run_dir)
    config = (require_run_dir(run_dir) / CONFIG).read_text(encoding="utf-8")
    summary = _read_json(run_dir / SUMMARY)
    metrics = _read_jsonl(run_dir / METRICS)
    evaluation = _read_json(run_dir / EVAL / "summary.json")
    predictions = _read_jsonl(run_dir / EVAL / "predictions.jsonl")

    plots = run_dir / PLOTS
    plots.mkdir(exist_ok=True)
    name = run_dir.resolve().name
    body = [f"<h1>{escape(name)}</h1>", f'<p class="muted">mathtune run folder <code>{escape(str(run_dir.resolve()))}</code></p>']

    body.append("<h2>Training</h2>")
    if summary is None:
        body.append('<p class="note">Training has not finished: there is no train_summary.json yet. '
                    "The loss plot shows what metrics.jsonl holds so far.</p>")
    body.append(_run_table(summary, config))
    loss_png = _loss_plot(metrics)
    if loss_png:
        write_bytes(plots / "loss.png", loss_png)
        body.append(_img(loss_png, "train and eval loss per step"))
    else:
        body.append('<p class="muted">No losses logged yet (metrics.jsonl is missing or empty).</p>')
    reward = reward_figure(metrics)
    if reward is not None:
        reward_png = png(reward)
        write_bytes(plots / "reward.png", reward_png)
        body.append(_img(reward_png, "GRPO reward per step: mean with its spread, and the share of correct answers"))

    body.append("<h2>Verified accuracy</h2>")
    if evaluation is None:
        body.append(f'<p class="note" id="no-eval">No evaluation yet: run <code>mathtune eval {escape(str(run_dir))} '
                    "--base</code> to score the fine-tuned and base models, then <code>mathtune report</code> again.</p>")
    else:
        body.append(_warning(evaluation, "the held-out split"))
        body.append(_accuracy_section(evaluation))
        accuracy_png = _accuracy_plot(evaluation)
        write_bytes(plots / "accuracy.png", accuracy_png)
        body.append(_img(accuracy_png, "accuracy per topic"))
    body.append(_bench_sections(run_dir, plots))
    if evaluation is not None:
        body.append("<h2>Sample answers</h2>")
        body.append(_samples(predictions))

    body.append(f"<h2>Config</h2><details><summary>config.yaml</summary><pre>{escape(config)}</pre></details>")

    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>mathtune report: {escape(name)}</title>\n<style>{CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    out = run_dir / REPORT
    write_text(out, page)
    return out


# ---------------------------------------------------------------------------------------------
# Sections


def _run_table(summary: dict | None, config: str) -> str:
    rows: list[tuple[str, str]] = []
    if summary is None:
        import yaml

        path = (yaml.safe_load(config) or {}).get("model", {}).get("path")
        rows.append(("model", f"<code>{escape(str(path))}</code>" if path else "mathtune's default model"))
    else:
        s, model = summary, summary.get("model", {})
        rows.append(("model", f"<code>{escape(str(model.get('path')))}</code> ({escape(str(model.get('kind')))})"))
        rows.append(("device", escape(str(s.get("device")) + (f", {s['precision']}" if s.get("precision") else ""))))
        rows.append(("steps", f"{s['steps']} ({s.get('epochs', 0):g} epochs)"))
        seconds = s.get("train_seconds") or 0
        rows.append(("wall time", f"{seconds:.1f} s ({int(seconds // 60)} min {seconds % 60:.0f} s)"))
        rows.append(("tokens/s", f"{s.get('tokens_per_second') or 0:,.1f} ({s.get('tokens_seen') or 0:,} tokens)"))
        rows.append(("train loss", f"{_num(s.get('first_train_loss'))} → {_num(s.get('last_train_loss'))}"
                                   f" (mean {_num(s.get('train_loss_mean'))})"))
        before, after = s.get("eval_loss_before"), s.get("eval_loss_after")
        change = f" ({after - before:+.4f})" if before is not None and after is not None else ""
        rows.append(("eval loss", f"{_num(before)} → {_num(after)}{change}"))
        trainable, total = s.get("trainable_parameters"), s.get("total_parameters")
        if trainable and total:
            rows.append(("parameters", f"{trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)"))
        rows.append(("LoRA on", escape(", ".join(s.get("lora_targets") or []))))
        rows.append(("examples", f"{s.get('train_examples')} train, {s.get('eval_examples')} held out"))
        if s.get("resumed_from"):
            rows.append(("resumed from", f"<code>{escape(str(s['resumed_from']))}</code>"))
    cells = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table id="run">{cells}</table>'


def _accuracy_section(evaluation: dict, table_id: str = "accuracy") -> str:
    """The `comparison_table` of accuracy.py as HTML: per topic n, base, fine-tuned and the paired
    change, each with its 95% interval; rows too small to compare are not coloured."""
    models = evaluation["models"]
    names = [name for name in ("base", "finetuned") if name in models]
    change = evaluation.get("change")
    data = evaluation.get("data")
    where = ("the run's " + str(evaluation.get("split")) + " split" if data == "run"
             else data if isinstance(data, str) else ", ".join(map(str, data or [])))
    head = f'<p class="muted">{evaluation.get("examples")} examples of {escape(where)} ({evaluation.get("seconds")} s).</p>'
    columns = ["topic", "n", *("fine-tuned" if n == "finetuned" else n for n in names),
               *(["change (points)", "p (McNemar)"] if change else [])]
    rows = ["<tr>" + "".join(f"<th>{c}</th>" for c in columns) + "</tr>"]
    first = models[names[0]]
    for topic in [*first["by_topic"], "all"]:
        cells = [f'<td class="topic">{escape(topic)}</td>', f'<td class="num n">{topic_row(first, topic)["checked"]}</td>']
        cells += [f'<td class="num {name}">{accuracy_text(topic_row(models[name], topic))}</td>' for name in names]
        if change:
            c = topic_row(change, topic)
            if c.get("too_small"):
                cells.append(f'<td class="change small" colspan="2">n &lt; {MIN_COMPARE}: too few to compare</td>')
            else:
                trend = "" if not c["significant"] else "up" if c["difference"] > 0 else "down"
                cells.append(f'<td class="num change {trend}">{100 * c["difference"]:+.1f} '
                             f'[{100 * c["low"]:+.1f}, {100 * c["high"]:+.1f}]</td>')
                cells.append(f'<td class="num p">{p_text(c["p_value"])}</td>')
        rows.append(f'<tr class="{"all" if topic == "all" else "row"}" data-topic="{escape(topic)}">{"".join(cells)}</tr>')
    table = f'<table id="{escape(table_id)}" class="accuracy">{"".join(rows)}</table>'
    counts = "; ".join(f"{'fine-tuned' if n == 'finetuned' else n}: {models[n]['correct']} correct, {models[n]['wrong']} "
                       f"wrong, {models[n]['truncated']} truncated" for n in names)
    protocol = evaluation.get("protocol")
    table += (f'<p class="muted">95% intervals: Wilson for each accuracy, Newcombe (paired) for the change; p: '
              f"McNemar's exact test on the same problems. A change is coloured only when p &lt; 0.05.<br>{escape(counts)} "
              f"(truncated: hit the token limit before stating an answer).</p>")
    if protocol:
        table += f'<p class="protocol">{escape(protocol_text(protocol))}</p>'
    tuned = models.get("finetuned") or first
    if tuned.get("uncheckable"):
        loss = ", ".join(f"{'fine-tuned' if n == 'finetuned' else n} {models[n]['reference_loss']} (perplexity "
                         f"{models[n]['reference_perplexity']})" for n in reversed(names))
        table += (f'<p id="uncheckable">{tuned["uncheckable"]} examples without a checkable answer: '
                  f"reference loss per token {loss}</p>")
    return head + table


def _bench_sections(run_dir: Path, plots: Path) -> str:
    """General math (RUN_DIR/bench/NAME/summary.json), or how to check it when it was not run."""
    folders = sorted(p.parent for p in (run_dir / BENCH).glob("*/summary.json"))
    if not folders:
        return (f'<h2>General math</h2><p class="muted" id="no-bench">Not checked: <code>mathtune eval '
                f"{escape(str(run_dir))} --bench gsm8k</code> scores base and fine-tuned on GSM8K problems shipped "
                "with mathtune, to catch a loss of general math ability.</p>")
    parts = []
    for folder in folders:
        name = folder.name
        evaluation = _read_json(folder / "summary.json")
        png = _accuracy_plot(evaluation)
        write_bytes(plots / f"bench-{name}.png", png)
        parts += [f'<h2 id="bench-{escape(name)}">General math: {escape(name)}</h2>', _warning(evaluation, name),
                  _accuracy_section(evaluation, f"bench-{name}-accuracy"), _img(png, f"{name} accuracy")]
    return "\n".join(parts)


def _warning(evaluation: dict, what: str) -> str:
    warning = significant_drop(evaluation, what)
    return f'<p class="note warning">{escape(warning)}</p>' if warning else ""


def _samples(predictions: list[dict]) -> str:
    checked = [p for p in predictions if p.get("checkable") and "response" in p.get("finetuned", {})]
    right = [p for p in checked if p["finetuned"].get("correct")][:SAMPLES]
    wrong = [p for p in checked if not p["finetuned"].get("correct")][:SAMPLES]
    if not right and not wrong:
        return '<p class="muted">No checkable predictions in eval/predictions.jsonl.</p>'
    intro = (f'<p class="muted">The first {len(right)} correct and {len(wrong)} wrong answers of the fine-tuned '
             "model in eval/predictions.jsonl.</p>")
    return intro + "\n".join(_sample(p) for p in right + wrong)


def _sample(record: dict) -> str:
    prompt = record.get("prompt") or []
    users = [m for m in prompt if m.get("role") == "user"]
    question = users[-1]["content"] if users else ""
    earlier = [m for m in prompt[:-1] if m.get("role") != "system"]
    context = f" · after {len(earlier)} earlier turns" if earlier else ""
    mark = _mark(record["finetuned"].get("correct"))
    cols = [("prompt", question, None), ("reference", record.get("reference", ""), None),
            ("fine-tuned", record["finetuned"].get("response", ""), record["finetuned"])]
    if "response" in record.get("base", {}):
        cols.append(("base", record["base"]["response"], record["base"]))
    divs = []
    for label, text, result in cols:
        extra = ""
        if result is not None:
            extra = (f'<div class="answer">{_mark(result.get("correct"))} answer '
                     f'<code>{escape(str(result.get("predicted") or "—"))}</code>, expected '
                     f'<code>{escape(str(result.get("expected") or "—"))}</code></div>')
        elif label == "prompt" and earlier:
            turns = "\n\n".join(f"{m.get('role')}: {m.get('content', '')}" for m in earlier)
            extra = f'<details class="answer"><summary>earlier turns</summary><pre>{escape(turns)}</pre></details>'
        divs.append(f'<div><div class="label">{label}</div><div class="response">{escape(text)}</div>{extra}</div>')
    return (f'<div class="sample"><h3>{mark} {escape(str(record.get("topic")))}{context}</h3>'
            f'<div class="cols">{"".join(divs)}</div></div>')


def _mark(correct: bool | None) -> str:
    return '<span class="ok">✓</span>' if correct else '<span class="bad">✗</span>'


# ---------------------------------------------------------------------------------------------
# Plots


def _loss_plot(metrics: list[dict]) -> bytes | None:
    fig = loss_figure(metrics)
    return None if fig is None else png(fig)


def loss_figure(metrics: list[dict]):
    """Train loss per logged step, and the held-out loss where it was measured (None: nothing logged)."""
    train = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    held_out = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
    if not train and not held_out:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    if train:
        ax.plot(*zip(*train), marker=".", label="train loss")
    if held_out:
        # Before and after alone are two measurements, not a curve: a line between them would draw
        # values nobody measured. Periodic evaluations (train.eval_steps) are joined.
        periodic = len(held_out) > 2
        ax.plot(*zip(*held_out), marker="o", linestyle="--" if periodic else "none", label="eval loss (held-out)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per label token")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def reward_figure(metrics: list[dict]):
    """A GRPO run's reward per logged step (mean, +- its spread over the step's answers) and the share
    of answers the verifier found correct; None when nothing of the kind was logged (SFT, DPO)."""
    rows = [r for r in metrics if r.get("reward") is not None]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    mean = [r["reward"] for r in rows]
    spread = [r.get("reward_std") or 0.0 for r in rows]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.plot(steps, mean, marker=".", label="reward (mean)")
    ax.fill_between(steps, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)], alpha=0.2,
                    label="+- spread (std)")
    correct = [(r["step"], r["rewards/correctness/mean"]) for r in rows if r.get("rewards/correctness/mean") is not None]
    if correct:
        ax.plot(*zip(*correct), marker=".", linestyle="--", label="share correct")
    ax.set_xlabel("step")
    ax.set_ylabel("reward per answer")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _accuracy_plot(evaluation: dict) -> bytes:
    models = evaluation["models"]
    series = [(label, models[name], color) for name, label, color in
              (("base", "base", "#9aa5b1"), ("finetuned", "fine-tuned", "#2b7bba")) if name in models]
    topics = [*series[0][1]["by_topic"], "all"]
    plt = pyplot()
    height = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.2 * len(topics) * len(series)))
    for k, (label, model, color) in enumerate(series):
        rows = [topic_row(model, t) for t in topics]
        values = [100 * r["accuracy"] for r in rows]
        # 95% Wilson interval as an error bar: a bar of n = 3 and one of n = 80 do not look alike.
        errors = [[v - 100 * r["interval"]["low"] for v, r in zip(values, rows)],
                  [100 * r["interval"]["high"] - v for v, r in zip(values, rows)]]
        ys = [i + (k - (len(series) - 1) / 2) * height for i in range(len(topics))]
        bars = ax.barh(ys, values, height=height, label=label, color=color, xerr=errors,
                       error_kw={"ecolor": "#444", "capsize": 2, "elinewidth": 0.8})
        ax.bar_label(bars, labels=[f"{v:.1f}%" for v in values], padding=3, fontsize=8)
    counts = [topic_row(series[0][1], t)["checked"] for t in topics]
    ax.set_yticks(range(len(topics)), [f"{t} (n={n})" for t, n in zip(topics, counts)])
    ax.invert_yaxis()  # first topic on top, "all" at the bottom, as in the table
    ax.set_xlim(0, 112)
    ax.set_xlabel("verified accuracy (%), 95% interval")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(series), frameon=False)
    return png(fig)


def _img(png: bytes, alt: str) -> str:
    return f'<p><img alt="{alt}" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>'


# ---------------------------------------------------------------------------------------------
# Files


def _read_json(path: Path) -> Any:
    return _decode(path.read_text(encoding="utf-8"), path, None) if path.is_file() else None


def _read_jsonl(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()  # a line cut short by a crash (metrics.jsonl is appended to while training)
    return [_decode(line, path, i) for i, line in enumerate(lines, 1) if line.strip()]


def _decode(text: str, path: Path, line: int | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"{path}, line {line}" if line else str(path)
        raise MathtuneError(f"{where}: not valid JSON ({exc.msg}); was the file edited or cut short?") from None


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"
