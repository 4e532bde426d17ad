"""DPO: learn from preference pairs, the chosen answer over the rejected one (TRL's DPOTrainer).

    mathtune train --method dpo --data pares.jsonl
    mathtune train --method dpo --data pares.jsonl --init-from runs/sft

The pairs are the shapes the data readers already read (data/formats.py): {"prompt", "chosen",
"rejected"} as text or as message lists (TRL's two forms), and LLaMA-Factory's {"conversations",
"chosen", "rejected"}. The prompt is what both sides share (system prompt and earlier turns
included); chosen and rejected are what follows it. The reference model is the starting model: the
base with the adapter switched off, or, with `model.adapter`, the adapter the run started from, kept
by TRL as a frozen second adapter ("ref"), not a second copy of the model. metrics.jsonl gets
TRL's rewards/chosen, rewards/rejected, rewards/accuracies (the share of pairs the model ranks
right) and rewards/margins per logged step; the held-out pairs give the eval loss before and after.
"""

from __future__ import annotations

from pathlib import Path

from mathtune.config import Config
from mathtune.data.formats import RecordError
from mathtune.errors import DataError
from mathtune.run import METRICS
from mathtune.train.arguments import shared_arguments
from mathtune.train.checkpoints import SafeTrainingMixin
from mathtune.train.metrics import RunLogger


def split_pair(chosen: list[dict], rejected: list[dict]) -> dict[str, list[dict]]:
    """{"prompt", "chosen", "rejected"}: the turns both conversations share, then each one's answer."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] == "assistant":  # an answer is not part of the prompt
        shared -= 1
    if shared == 0 or chosen[shared - 1]["role"] not in ("user", "system"):
        raise RecordError("rejected", "the chosen and rejected conversations share no prompt")
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def dpo_pairs(conversations, split: str):
    """The dataset DPOTrainer reads, from conversations loaded with data.preference: pairs."""
    import datasets

    rows = []
    for i, row in enumerate(conversations):
        try:
            rows.append(split_pair(row["messages"], row["rejected"]))
        except RecordError as exc:
            raise DataError([f"{split} pair {i + 1}: {exc}"]) from None
    return datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict(
        {"prompt": [], "chosen": [], "rejected": []})


def build_dpo_trainer(cfg: Config, model, tokenizer, train_pairs, eval_pairs, run_dir: Path, device: str, dtype,
                      main_process: bool):
    """DPOTrainer over the PEFT model (LoRA already applied), with mathtune's checkpoints and log."""
    # TRL takes seconds to import: only DPO and GRPO runs load it.
    from transformers.trainer_callback import ProgressCallback
    from trl import DPOConfig, DPOTrainer

    class RunDPOTrainer(SafeTrainingMixin, DPOTrainer):
        """TRL's DPOTrainer with whole checkpoints and a stop on a non-finite loss."""

    t = cfg.train
    args = DPOConfig(
        **shared_arguments(cfg, run_dir, device, dtype),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        beta=cfg.dpo.beta,
        max_length=cfg.data.max_seq_length,
        eval_strategy="steps" if t.eval_steps and len(eval_pairs) else "no",
        eval_steps=t.eval_steps or None,
        gradient_checkpointing=t.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    trainer = RunDPOTrainer(model=model, args=args, train_dataset=train_pairs,
                            eval_dataset=eval_pairs if len(eval_pairs) else None, processing_class=tokenizer)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(RunLogger(run_dir / METRICS, show_progress=main_process, write=main_process))
    return trainer
