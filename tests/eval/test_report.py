"""report.py on a small run folder written in the real formats (summarize / write_eval of evaluate.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mathtune.config import dump_config, load_config
from mathtune.errors import MathtuneError
from mathtune.eval.accuracy import comparison_table, paired_change, summarize
from mathtune.eval.evaluate import EvalExample, write_eval
from mathtune.eval.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM = Path("/usr/bin/chromium")
NASTY = "<script>alert(1)</script> so x < 3 & y > 1.\nThe answer is \\boxed{3}."


def _example(question: str, answer: str, topic: str, checkable: bool = True, earlier: int = 0) -> EvalExample:
    prompt = [{"role": "system", "content": "You are a math tutor."}]
    for i in range(earlier):
        prompt += [{"role": "user", "content": f"warm-up {i}"}, {"role": "assistant", "content": f"\\boxed{{{i}}}"}]
    prompt.append({"role": "user", "content": question})
    return EvalExample(prompt=prompt, reference=answer, topic=topic, checkable=checkable)


def _answer(response: str, predicted: str | None, expected: str, correct: bool, truncated: bool = False) -> dict:
    return {"response": response, "predicted": predicted, "expected": expected, "correct": correct,
            "reason": "correct" if correct else "mismatch" if predicted else "no_answer", "truncated": truncated}


PROTOCOL = {"prompt": "the model's chat template, system prompt 'You are a math tutor.', zero-shot",
            "decoding": "greedy", "max_new_tokens": 64, "stop_tokens": ["<|im_end|>"],
            "verifier": "math-verify 0.9.0 (mathtune.verify)"}


def _summary(examples, runs: dict, **meta) -> dict:
    """summary.json as evaluate_model writes it."""
    return {"data": "run", "split": "eval", **meta, "examples": len(examples), "protocol": PROTOCOL,
            "models": {name: summarize(examples, results) for name, results in runs.items()},
            "change": paired_change(examples, runs["base"], runs["finetuned"]) if len(runs) == 2 else None,
            "seconds": 3.2}


def _write_eval(run_dir: Path, base: bool = True) -> dict:
    examples = [
        _example("Solve 2x = 6.", "x = 3.\nThe answer is \\boxed{3}.", "algebra", earlier=1),
        _example("Solve x + 1 = 5.", "The answer is \\boxed{4}.", "algebra"),
        _example("Area of a 2 by 3 rectangle?", "2 * 3 = 6.\nThe answer is \\boxed{6}.", "geometry"),
        _example("Is 3 < 5 & 5 < 7?", "Yes: the answer is \\boxed{1}.", "geometry"),
        _example("Perimeter of a unit square?", "The answer is \\boxed{4}.", "geometry"),
        _example("Explain what a derivative is.", "The slope of the tangent line.", "other", checkable=False),
    ]
    finetuned = [
        _answer(NASTY, "3", "3", True),
        _answer("The answer is \\boxed{5}.", "5", "4", False),
        _answer("The answer is \\boxed{6}.", "6", "6", True),
        _answer("The answer is \\boxed{1}.", "1", "1", True),
        _answer("Let x be the side. Then", None, "4", False, truncated=True),
        {"reference_loss": 1.25},
    ]
    runs = {"finetuned": finetuned}
    if base:
        runs["base"] = [
            _answer("x = 2", "2", "3", False),
            _answer("The answer is \\boxed{3}.", "3", "4", False),
            _answer("The answer is \\boxed{6}.", "6", "6", True),
            _answer("No.", None, "1", False),
            _answer("The answer is \\boxed{5}.", "5", "4", False),
            {"reference_loss": 2.5},
        ]
    summary = _summary(examples, runs)
    write_eval(run_dir / "eval", examples, runs, summary)
    return summary


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A finished run with metrics, train summary and an evaluation of both models."""
    run = tmp_path / "run-20261125"
    run.mkdir()
    (run / "config.yaml").write_text(dump_config(load_config(environ={})), encoding="utf-8")
    metrics = [
        {"step": 0, "eval_loss": 2.1, "eval_runtime": 1.0, "epoch": 0, "num_input_tokens_seen": 0},
        *({"step": s, "loss": 2.0 - 0.2 * s, "grad_norm": 0.5, "learning_rate": 1e-4, "epoch": s / 10,
           "num_input_tokens_seen": 500 * s, "tokens_per_second": 250.0} for s in (2, 4, 6)),
        {"step": 6, "train_runtime": 12.0, "train_loss": 1.4, "epoch": 0.6, "num_input_tokens_seen": 3000},
        {"step": 6, "eval_loss": 1.3, "eval_runtime": 1.0, "epoch": 0.6, "num_input_tokens_seen": 3000},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics), encoding="utf-8")
    summary = {
        "model": {"kind": "folder", "path": "/models/tiny-llama", "loaded_from": "/models/tiny-llama"},
        "steps": 6, "steps_this_session": 6, "epochs": 0.6, "trainable_parameters": 4096,
        "total_parameters": 100_000, "lora_targets": ["q_proj", "v_proj"], "train_examples": 90,
        "eval_examples": 10, "truncated_examples": 0, "dropped_examples": 0, "skipped_invalid_records": 0,
        "tokens_seen": 3000, "train_seconds": 12.34, "tokens_per_second": 243.1, "first_train_loss": 1.6,
        "last_train_loss": 0.8, "train_loss_mean": 1.2, "eval_loss_before": 2.1, "eval_loss_after": 1.3,
        "resumed_from": None, "device": "cpu",
    }
    (run / "train_summary.json").write_text(json.dumps(summary), encoding="utf-8")
    _write_eval(run)
    return run


class _Table(HTMLParser):
    """Rows of <table id="accuracy"> (or another id): {topic: {cell class: text}}."""

    def __init__(self, table_id: str = "accuracy"):
        super().__init__()
        self.table_id = table_id
        self.rows: dict[str, dict[str, str]] = {}
        self._inside, self._topic, self._cell = False, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._inside = attrs.get("id") == self.table_id
        elif self._inside and tag == "tr" and "data-topic" in attrs:
            self._topic = attrs["data-topic"]
            self.rows[self._topic] = {}
        elif self._inside and tag == "td" and self._topic:
            classes = attrs["class"].split()
            self._cell = classes[1] if classes[0] == "num" else classes[0]

    def handle_endtag(self, tag):
        if tag == "table":
            self._inside = False
        elif tag == "td":
            self._cell = None

    def handle_data(self, data):
        if self._cell and self._topic:
            self.rows[self._topic][self._cell] = self.rows[self._topic].get(self._cell, "") + data


def _table(html: str, table_id: str = "accuracy") -> dict[str, dict[str, str]]:
    parser = _Table(table_id)
    parser.feed(html)
    return parser.rows


def test_report_is_one_self_contained_file(run_dir):
    page = write_report(run_dir)
    assert page == run_dir / "report.html"
    html = page.read_text(encoding="utf-8")
    assert "<title>mathtune report: run-20261125</title>" in html
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "<link" not in html and "<script" not in html and "@import" not in html
    assert html.count("data:image/png;base64,") == 2
    assert "1.6000 → 0.8000" in html and "2.1000 → 1.3000 (-0.8000)" in html
    assert "4,096 trainable of 100,000 (4.10%)" in html and "/models/tiny-llama" in html
    assert "<details><summary>config.yaml</summary>" in html and "learning_rate:" in html


def test_table_numbers_are_those_of_the_summary(run_dir):
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    rows = _table(write_report(run_dir).read_text(encoding="utf-8"))
    tuned, change = summary["models"]["finetuned"], summary["change"]
    assert list(rows) == ["algebra", "geometry", "all"]
    for topic, row in rows.items():
        t = tuned if topic == "all" else tuned["by_topic"][topic]
        assert row["n"] == str(t["checked"])
        assert row["finetuned"] == (f"{100 * t['accuracy']:.1f}% [{100 * t['interval']['low']:.1f}-"
                                    f"{100 * t['interval']['high']:.1f}]")
    # Topics of fewer than 10 problems: intervals, but no change, and no colour.
    assert rows["geometry"] == {"topic": "geometry", "n": "3", "base": "33.3% [6.2-79.2]",
                                "finetuned": "66.7% [20.8-93.8]", "change": "n < 10: too few to compare"}
    assert (change["difference"], change["only_tuned"], change["only_base"]) == (0.4, 2, 0)
    assert rows["all"]["change"] == f"+40.0 [{100 * change['low']:+.1f}, {100 * change['high']:+.1f}]"
    assert rows["all"]["p"] == "0.50"
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert 'class="num change "' in html  # p = 0.5: not coloured as a gain
    # The same cells as the table `mathtune eval` prints.
    printed = {line.split()[0]: line for line in comparison_table(summary).splitlines()[2:5]}
    for topic, row in rows.items():
        assert all(row[cell] in printed[topic] for cell in ("base", "finetuned")), printed[topic]
    assert rows["all"]["change"] in printed["all"] and "n < 10, too few" in printed["geometry"]


def test_protocol_counts_and_intervals_are_on_the_page(run_dir):
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert "greedy, at most 64 new tokens, stop at &lt;|im_end|&gt;; verified by math-verify 0.9.0" in html
    assert "system prompt &#x27;You are a math tutor.&#x27;, zero-shot" in html
    assert "fine-tuned: 3 correct, 1 wrong, 1 truncated" in html and "base: 1 correct, 4 wrong, 0 truncated" in html
    assert "Wilson" in html and "McNemar" in html


def test_a_significant_drop_is_a_warning_and_a_bench_gets_its_own_section(run_dir):
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert "mathtune eval" in html and "--bench gsm8k" in html and 'id="no-bench"' in html
    assert "made the model worse" not in html
    examples = [EvalExample([{"role": "user", "content": f"q{i}"}], f"#### {i}", "arithmetic", True) for i in range(30)]
    runs = {"base": [_answer(str(i), str(i), str(i), i < 20) for i in range(30)],
            "finetuned": [_answer(str(i), str(i), str(i), i < 8) for i in range(30)]}
    write_eval(run_dir / "bench" / "gsm8k", examples, runs, _summary(examples, runs, bench="gsm8k",
                                                                     data="GSM8K test, 300-problem seeded sample"))
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert 'id="no-bench"' not in html and 'id="bench-gsm8k"' in html
    assert "Fine-tuning made the model worse on gsm8k: 66.7% -&gt; 26.7% (-40.0 [" in html
    assert "McNemar exact p &lt; 0.001" in html
    rows = _table(html, "bench-gsm8k-accuracy")
    assert rows["arithmetic"]["change"].startswith("-40.0 [") and 'class="num change down"' in html
    assert (run_dir / "plots" / "bench-gsm8k.png").read_bytes().startswith(PNG_MAGIC)


def test_uncheckable_line_and_samples(run_dir):
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert "1 examples without a checkable answer: reference loss per token fine-tuned 1.25" in html
    assert "base 2.5" in html
    assert "The first 3 correct and 2 wrong answers" in html
    assert html.count('class="sample"') == 5
    assert "Solve 2x = 6." in html and "after 2 earlier turns" in html and "warm-up 0" in html


def test_text_from_files_is_escaped(run_dir):
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; so x &lt; 3 &amp; y &gt; 1." in html
    assert "Is 3 &lt; 5 &amp; 5 &lt; 7?" in html


def test_plots_are_pngs(run_dir):
    write_report(run_dir)
    for name in ("loss.png", "accuracy.png"):
        data = (run_dir / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    assert not list((run_dir / "plots").glob("*.tmp"))


def test_same_run_gives_the_same_bytes(run_dir):
    first = write_report(run_dir).read_bytes()
    plots = {p.name: p.read_bytes() for p in (run_dir / "plots").iterdir()}
    assert write_report(run_dir).read_bytes() == first
    assert {p.name: p.read_bytes() for p in (run_dir / "plots").iterdir()} == plots


def test_run_without_evaluation_says_how_to_evaluate(run_dir):
    shutil.rmtree(run_dir / "eval")
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert "No evaluation yet" in html and f"mathtune eval {run_dir} --base" in html
    assert html.count("data:image/png;base64,") == 1
    assert 'id="accuracy"' not in html and not (run_dir / "plots" / "accuracy.png").exists()


def test_unfinished_run_says_so(run_dir):
    shutil.rmtree(run_dir / "eval")
    (run_dir / "train_summary.json").unlink()
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert "Training has not finished" in html
    assert html.count("data:image/png;base64,") == 1  # the loss so far


def test_evaluation_without_base(run_dir):
    shutil.rmtree(run_dir / "eval")
    _write_eval(run_dir, base=False)
    html = write_report(run_dir).read_text(encoding="utf-8")
    rows = _table(html)
    assert rows["all"] == {"topic": "all", "n": "5", "finetuned": "60.0% [23.1-88.2]"}
    assert ">base<" not in html
    assert (run_dir / "plots" / "accuracy.png").read_bytes().startswith(PNG_MAGIC)


def test_crashed_run_and_wrong_folder(run_dir, tmp_path):
    with (run_dir / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 8, "loss": 0.')  # the line being written when training died
    assert "Training" in write_report(run_dir).read_text(encoding="utf-8")
    (run_dir / "eval" / "predictions.jsonl").write_text('{"prompt": []}\nnot json\n')
    with pytest.raises(MathtuneError, match=r"predictions.jsonl, line 2: not valid JSON"):
        write_report(run_dir)
    with pytest.raises(MathtuneError, match="not a mathtune run folder"):
        write_report(tmp_path / "nothing-here")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium to render the page")
def test_page_renders_in_a_browser(run_dir, tmp_path):
    page = write_report(run_dir)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
         page.resolve().as_uri()],
        capture_output=True, timeout=60, check=False,
    )
    assert shot.is_file() and shot.read_bytes().startswith(PNG_MAGIC)
    assert shot.stat().st_size > 20_000


@pytest.mark.parametrize("eval_steps, joined", [((0, 54), False), ((0, 20, 40, 54), True)])
def test_eval_loss_is_a_line_only_when_it_was_measured_along_the_way(eval_steps, joined):
    from mathtune.display import pyplot
    from mathtune.eval.report import loss_figure

    metrics = [{"step": s, "loss": 2.0 - s / 100} for s in range(10, 55, 10)]
    metrics += [{"step": s, "eval_loss": 1.9 - s / 100} for s in eval_steps]
    fig = loss_figure(metrics)
    held_out = next(line for line in fig.axes[0].lines if line.get_label().startswith("eval loss"))
    assert list(held_out.get_xdata()) == list(eval_steps)
    assert (held_out.get_linestyle() != "None") == joined
    pyplot().close(fig)


def test_a_grpo_run_gets_its_reward_curve_and_an_sft_run_none(run_dir):
    from mathtune.display import pyplot
    from mathtune.eval.report import reward_figure

    metrics = [{"step": s, "loss": 0.0, "reward": 0.2 + s / 100, "reward_std": 0.1,
                "rewards/correctness/mean": s / 100} for s in range(1, 6)]
    fig = reward_figure(metrics)
    lines = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].lines}
    assert lines["reward (mean)"] == pytest.approx([0.21, 0.22, 0.23, 0.24, 0.25])
    assert lines["share correct"] == pytest.approx([0.01, 0.02, 0.03, 0.04, 0.05])
    pyplot().close(fig)
    assert reward_figure([{"step": 1, "loss": 1.2}]) is None

    with (run_dir / "metrics.jsonl").open("a") as fh:
        fh.write("".join(json.dumps(m) + "\n" for m in metrics))
    page = write_report(run_dir).read_text()
    assert (run_dir / "plots" / "reward.png").is_file() and 'alt="GRPO reward per step' in page
