"""The embedded default end to end: `mathtune train` with no settings learns measurable math.

Slow (12 minutes on 2 cores of an AMD EPYC without bf16 units, 3-5 on an Intel Xeon with AMX): run
with `bash scripts/test.sh -m slow`.

What it asserts is what held in every run measured. On 73 held-out problems the gain moves a lot
with the split and the training's rounding: the Intel Xeon with AMX, the default with three seeds
(the seed also draws the held-out split) in each precision, main of 2026-12-08:

| seed, precision | base | fine-tuned | change, 95% interval | p | gained / lost | truncated |
| --- | --- | --- | --- | --- | --- | --- |
| 42, bf16 (the default here) | 11.0% | 17.8% | +6.9 [-4.1, +17.8] | 0.30 | 10 / 5 | 31 -> 2 |
| 42, float32 | 8.2% | 21.9% | +13.7 [+2.9, +24.7] | 0.021 | 13 / 3 | 38 -> 1 |
| 1, bf16 | 6.9% | 12.3% | +5.5 [-5.0, +16.1] | 0.42 | 9 / 5 | 36 -> 1 |
| 1, float32 | 1.4% | 9.6% | +8.2 [+0.4, +17.2] | 0.070 | 7 / 1 | 38 -> 2 |
| 2, bf16 (71 checkable) | 4.2% | 29.6% | +25.4 [+13.4, +37.1] | < 0.001 | 20 / 2 | 37 -> 2 |
| 2, float32 | 4.2% | 22.5% | +18.3 [+7.2, +29.6] | 0.002 | 15 / 2 | 38 -> 2 |

Seed 42 in float32 gave the same figures on an AMD EPYC without bf16 units (2026-11-28); in bf16
on an AMD EPYC Zen 4, 8.2% -> 19.2% (+11.0, p = 0.096). The learning rate (2e-3) was chosen on
seed 42's split in float32, the best of the six here only for that reason. So the test asserts
the gain and the answer format learnt (an answer stated within the token limit), not the gain's
size or its significance at 5%, which depend on the split and on how the CPU rounds.
"""

from __future__ import annotations

import json

import pytest

from mathtune.config import load_config
from mathtune.train.recipe import train


@pytest.mark.slow
def test_the_embedded_default_beats_the_base_model_on_held_out_problems(tmp_path, model_cache):
    cfg = load_config(overrides={"model.cache_dir": str(model_cache), "output.dir": str(tmp_path / "run")}, environ={})
    summary = train(cfg).summary
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 1.0  # measured: 1.90 -> 0.46 in each precision

    evaluation = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    base, tuned = evaluation["models"]["base"], evaluation["models"]["finetuned"]
    assert evaluation["examples"] == 82 and tuned["checked"] == base["checked"] == 73  # the whole held-out split
    # More problems gained than lost (measured 7-20 against 1-5), so a higher accuracy.
    assert evaluation["change"]["only_tuned"] > evaluation["change"]["only_base"]
    assert tuned["accuracy"] > base["accuracy"]
    # The format: the base runs out of tokens before an answer on 31-38 problems, the fine-tuned on 1-2.
    assert base["truncated"] >= 20 and tuned["truncated"] <= 5
    assert (tmp_path / "run" / "report.html").is_file()
