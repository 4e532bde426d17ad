"""The Trainer settings every method shares (SFT's TrainingArguments, TRL's GRPOConfig and DPOConfig)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mathtune.config import Config, learning_rate, resolve_optimizer
from mathtune.run import CHECKPOINTS


def shared_arguments(cfg: Config, run_dir: Path, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """The schedule (with the method's learning rate), checkpoints, precision and logging of a run,
    as Trainer keyword arguments; each method adds its batch and evaluation."""
    t = cfg.train
    return {
        "output_dir": str(run_dir / CHECKPOINTS),
        "max_steps": t.max_steps,
        "num_train_epochs": t.epochs,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": learning_rate(cfg),  # train, grpo or dpo .learning_rate
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": t.warmup_ratio,  # a float below 1 is a fraction of the total steps
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "optim": resolve_optimizer(cfg, device),
        "logging_steps": t.logging_steps,
        "save_strategy": "steps",
        "save_steps": t.save_steps,
        "save_total_limit": t.save_total_limit,
        "seed": t.seed,
        "data_seed": t.seed,
        # Autocast over bf16 weights on CUDA and on CPUs with bf16 units alike (hardware.resolve_dtype).
        "bf16": device in ("cuda", "cpu") and dtype == torch.bfloat16,
        "fp16": device == "cuda" and dtype == torch.float16,
        "use_cpu": device == "cpu",
        # Every LoRA parameter gets a gradient each step: DDP need not search the graph for unused ones
        # (that search also breaks with gradient checkpointing).
        "ddp_find_unused_parameters": False,
        # Experiment trackers: transformers' own callbacks, pointed at the run folder by train.trackers.
        "report_to": list(t.report_to),
        "run_name": run_dir.name,
        "project": "mathtune",  # Trackio's project (wandb's is WANDB_PROJECT)
        "disable_tqdm": False,
        "log_level": "warning",
    }
