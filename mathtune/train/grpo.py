"""GRPO: learn from the verifier. TRL's GRPOTrainer samples answers, mathtune.verify rewards them.

    mathtune train --method grpo --init-from runs/sft          # SFT first, then GRPO from its adapter
    mathtune train --config configs/grpo.yaml

Each step takes grpo.prompts_per_step problems of the training split, samples grpo.num_generations
answers to each (the model's chat template, the records' own system prompts, as the evaluation
prompts them), and rewards each answer:

  correctness  1 when `verify.validate_math_response` finds its final answer equal to the
               record's reference, else 0: the verdict the evaluation gives, so the reward and the
               score cannot disagree.
  format       grpo.format_reward x (1 for an answer that states its final answer, `\\boxed{}` or
               "La respuesta es ...", and ends before grpo.max_completion_length; else 0).

An answer's advantage is its reward against its group's mean, and the LoRA weights move toward the
better answers, held near the starting model by a KL penalty (grpo.beta). The starting model is
the base with the adapter switched off, or the adapter the run started from (`model.adapter`): TRL
keeps a frozen copy of it as a second adapter ("ref"), not a second model.

Only problems whose reference has a checkable final answer (`verify.reference_answer`) can be
rewarded: the others (concept explanations) are counted and left out. metrics.jsonl gets, per
logged step: reward and reward_std, rewards/correctness/mean (the share of correct answers),
rewards/format/mean, completions/mean_length and clipped_ratio, kl, step_time, and the generation's
seconds and tokens/s (generation/seconds, generation/tokens_per_second).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from mathtune.config import Config
from mathtune.errors import DataError
from mathtune.eval.evaluate import eval_examples, stop_token_ids
from mathtune.run import METRICS
from mathtune.train.arguments import shared_arguments
from mathtune.train.checkpoints import SafeTrainingMixin
from mathtune.train.metrics import RunLogger
from mathtune.verify import stated_answer, validate_math_response

log = logging.getLogger("mathtune")


def grpo_problems(conversations) -> tuple[Any, int]:
    """The training problems GRPO can reward: (dataset of prompt + reference, problems left out).

    A problem is a conversation up to its last assistant turn (system prompt and earlier turns
    included), its reference that turn; one without a checkable final answer is left out."""
    import datasets

    # The evaluation's reading of a conversation (eval_examples): GRPO rewards what eval scores.
    examples = eval_examples(conversations)
    problems = [e for e in examples if e.checkable]
    prompts, references, left_out = [e.prompt for e in problems], [e.reference for e in problems], len(examples) - len(problems)
    if not prompts:
        raise DataError([f"none of the {left_out} training records has a reference with a checkable final answer "
                         "(a number, expression, set... or \\boxed{}): GRPO has nothing to reward"],
                        hint="Train with train.method: sft, or add problems with final answers.")
    return datasets.Dataset.from_dict({"prompt": prompts, "reference": references}), left_out


def _text(completion: Any) -> str:
    """A completion as text: TRL passes [{"role": "assistant", "content": ...}] for chat prompts."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def correctness(completions: list, reference: list[str], **_) -> list[float]:
    """1.0 for each completion the verifier finds right against its problem's reference, else 0.0."""
    return [float(validate_math_response(_text(c).strip(), ref).correct) for c, ref in zip(completions, reference)]


def format_reward(stop_ids: list[int]):
    """The format reward: 1.0 for a completion that states its final answer and ended with one of
    `stop_ids` (not cut off by the length limit), else 0.0."""

    def format(completions: list, completion_ids: list[list[int]], **_) -> list[float]:  # noqa: A001 (TRL logs the name)
        stops = set(stop_ids)
        return [float(bool(stops & set(ids)) and stated_answer(_text(c)) is not None)
                for c, ids in zip(completions, completion_ids)]

    return format


def reward_functions(cfg: Config, stop_ids: list[int]) -> list:
    """The named rewards of a GRPO run (TRL logs each as rewards/NAME/mean), weighted 1 and grpo.format_reward."""
    return [correctness] + ([format_reward(stop_ids)] if cfg.grpo.format_reward else [])


class GenerationTiming:
    """Times TRL's generation of each batch of completions: generation/seconds and tokens/s per step."""

    def _generate_single_turn(self, *args, **kwargs):
        started = time.perf_counter()
        completion_ids, logprobs = super()._generate_single_turn(*args, **kwargs)
        seconds = time.perf_counter() - started
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["generation/seconds"].append(seconds)
        self._metrics[mode]["generation/tokens_per_second"].append(sum(map(len, completion_ids)) / seconds)
        return completion_ids, logprobs


def build_grpo_trainer(cfg: Config, model, tokenizer, problems, run_dir: Path, device: str, dtype,
                       main_process: bool):
    """GRPOTrainer over the PEFT model (LoRA already applied), with mathtune's checkpoints and log."""
    # TRL takes seconds to import: only GRPO and DPO runs load it.
    from transformers.trainer_callback import ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    class RunGRPOTrainer(SafeTrainingMixin, GenerationTiming, GRPOTrainer):
        """TRL's GRPOTrainer with whole checkpoints, a stop on a non-finite loss and generation timing."""

    g = cfg.grpo
    stops = stop_token_ids(tokenizer, model)
    model.generation_config.eos_token_id = stops  # TRL ends a completion at any of these, as the evaluation does
    args = GRPOConfig(
        **shared_arguments(cfg, run_dir, device, dtype),
        per_device_train_batch_size=g.prompts_per_step * g.num_generations,  # completions, not problems
        num_generations=g.num_generations,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        # The KV cache, which training switches off in the model's config (use_cache: False) and an
        # unset generation setting would inherit: without it each new token recomputes the whole answer.
        generation_kwargs={"use_cache": True},
        beta=g.beta,
        reward_weights=[1.0, g.format_reward] if g.format_reward else None,
        eval_strategy="no",  # the verified accuracy before and after is the evaluation
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        log_completions=False,
    )
    trainer = RunGRPOTrainer(model=model, reward_funcs=reward_functions(cfg, stops), args=args, train_dataset=problems,
                             processing_class=tokenizer)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(RunLogger(run_dir / METRICS, show_progress=main_process, write=main_process))
    return trainer
