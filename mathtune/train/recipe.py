"""The LoRA fine-tuning recipe: setup (config -> data -> model -> LoRA -> Trainer) -> fit -> finish.

    mathtune train                                  # embedded default: SmolLM2-135M + bundled math set
    mathtune train --config configs/mathstral-7b-qlora.yaml
    mathtune train --resume runs/20261125-101500    # continue from the last checkpoint
    mathtune train --method grpo --init-from runs/x  # then learn from the verifier (mathtune/train/grpo.py)
    mathtune train --method dpo --data pairs.jsonl   # or from preference pairs (mathtune/train/dpo.py)

The loop is transformers' Trainer, so `torchrun` and `accelerate launch` run this same code on
several processes (mathtune/distributed.py); rank 0 alone writes the run folder (mathtune/run.py):
config.yaml, metrics.jsonl, checkpoints/, adapter/ and train_summary.json.

    torchrun --nproc_per_node 2 -m mathtune train --config run.yaml     # CPU, DDP over gloo
"""

from __future__ import annotations

import inspect
import logging
import math
import pickle
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import PartialState
from accelerate.utils import extract_model_from_parallel
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed
from transformers.trainer_callback import ProgressCallback

from mathtune import distributed, hardware
from mathtune.config import Config, dump_config, settings_summary
from mathtune.data.dataset import DataReport, split_conversations
from mathtune.data.tokenize import IGNORE_INDEX, ensure_chat_template, tokenize_splits
from mathtune.doctor.doctor import preflight, unused_gpu_warning
from mathtune.errors import ConfigError, MathtuneError
from mathtune.eval.evaluate import (
    comparison_table,
    eval_examples,
    evaluate_model,
    perplexity,
    run_benches,
    warn_about_drops,
)
from mathtune.eval.report import write_report
from mathtune.files import write_json
from mathtune.hardware import resolve_device
from mathtune.locks import released_at_exit
from mathtune.model.load import ModelSource, load_model, resolve_source
from mathtune.run import ADAPTER, CHECKPOINTS, EVAL, METRICS, SUMMARY, check_resume, choose_run_dir, create_run_dir
from mathtune.train.arguments import shared_arguments
from mathtune.train.blocks import lean_blocks
from mathtune.train.checkpoints import GracefulInterrupt, SafeTrainingMixin
from mathtune.train.checkpoints import last_checkpoint as newest_complete_checkpoint
from mathtune.train.dpo import build_dpo_trainer, dpo_pairs
from mathtune.train.grpo import build_grpo_trainer, grpo_problems
from mathtune.train.lora import apply_lora, count_parameters, log_lora, lora_modules, save_adapter
from mathtune.train.loss import OutputLayerLoss, OutputLayerLossMixin, fusable_output_layer, label_only_loss
from mathtune.train.metrics import RunLogger, first_eval_loss, logged_eval_before, summary_text
from mathtune.train.packing import packed_collator, supports_padding_free, use_packed_attention
from mathtune.train.trackers import accuracies, log_final, reporting

if TYPE_CHECKING:
    import datasets
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("mathtune")


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict[str, Any]
    """What train_summary.json holds."""
    model: PeftModel
    """The trained PEFT model, still in memory (for evaluation right after training)."""
    tokenizer: PreTrainedTokenizerBase


@dataclass
class Job:
    """What `setup` prepares for `fit` and `finish`."""

    cfg: Config
    run_dir: Path
    state: PartialState
    """this process's rank among the run's processes"""
    device: str
    source: ModelSource
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    trainer: Trainer
    data: DataReport
    """examples, truncated, dropped, skipped"""
    eval_ds: datasets.Dataset
    eval_conv: datasets.Dataset
    """The held-out conversations, for the verified-accuracy evaluation at the end."""
    checkpoint: Path | None
    """Where a resumed run continues from."""
    eval_before: float | None
    """The eval loss before training, when an earlier session of this run logged it."""
    warnings: list[str]
    """Said before training and kept in train_summary.json (an NVIDIA GPU left unused...)."""


@dataclass
class Fit:
    seconds: float
    start_step: int
    train_loss_mean: float
    eval_before: float | None
    eval_after: float | None


def train(cfg: Config, resume: bool = False) -> TrainResult:
    """Run the whole job described by `cfg`: the run folder, the trained adapter and its summary."""
    with released_at_exit():  # the run folder's lock, taken in setup, is held until the run is over
        job = setup(cfg, resume)
        with reporting(job.trainer, job.run_dir):  # train.report_to, open until the accuracies are logged
            return finish(job, fit(job))


def setup(cfg: Config, resume: bool) -> Job:
    """Check everything, load the model, tokenize the data, apply LoRA, build the Trainer."""
    # Every record, the model path and the run folder are checked before anything is written or
    # loaded: a typo costs neither a run folder nor a model conversion.
    data = DataReport()
    if cfg.train.method == "dpo":
        cfg.data.preference = "pairs"  # both sides of each pair are read
    train_conv, eval_conv = split_conversations(cfg.data, cfg.train.seed, data)
    source = resolve_source(cfg.model)
    if source.kind == "gguf" and cfg.model.path and not Path(cfg.model.path).expanduser().is_file():
        cfg.model.path = source.path  # a name fragment (--model mathstral): the run records the file it chose
    problems = distributed.launch_problems(cfg)
    if problems:
        raise ConfigError(problems, "launch")
    device = resolve_device(cfg.model.device)
    preflight(cfg, source, device)  # a run that cannot fit stops here, before a conversion or a run folder
    state = distributed.process_state(device)
    if not state.is_main_process:
        log.setLevel(logging.WARNING)  # one copy of the progress messages: rank 0's
    # Rank 0 checks the folder (its name may come from its clock) and every rank gets its answer.
    run_dir = distributed.agree_on_run_dir(state, lambda: choose_run_dir(cfg.output.dir, resume, cfg.output.overwrite))
    cfg.output.dir = run_dir
    if resume:
        check_resume(run_dir, cfg)  # other data, model or LoRA settings would mix two trainings
    log.info("Run folder: %s\n%s", run_dir, settings_summary(cfg))
    # Said before anything slow: auto picked the CPU beside an NVIDIA GPU that PyTorch cannot use.
    gpu_warning = unused_gpu_warning(cfg.model.device, device) if state.is_main_process else None
    warnings = [gpu_warning] if gpu_warning else []
    for text in warnings:
        log.warning("WARNING: %s", text)

    if cfg.model.load_in_4bit and device == "cpu" and hardware.trim_heap_periodically():
        log.info("4-bit on the CPU: freed heap memory is handed back to the system every %.1f s (glibc's "
                 "malloc_trim), which keeps the peak near what the run holds at once", hardware.HEAP_TRIM_SECONDS)
    set_seed(cfg.train.seed)  # before LoRA: its A matrices are drawn from the global RNG
    model, tokenizer, source = _load_base(cfg, source, device, state, chat=not data.text)

    train_ds, eval_ds = _training_data(cfg, train_conv, eval_conv, tokenizer, data)
    log.info("Data:\n%s", "\n".join(data.lines()))
    # Written only now that the model, its chat template and the data are known to work together;
    # by rank 0 alone (another rank checking now could find rank 0's fresh files and refuse).
    if state.is_main_process:
        create_run_dir(run_dir, dump_config(cfg), resume)

    model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.train.gradient_checkpointing,
                       adapter=cfg.model.adapter)
    log_lora(model)
    trainer = build_trainer(cfg, model, tokenizer, train_ds, eval_ds, run_dir, device, state.is_main_process)
    checkpoint = eval_before = None
    if resume:
        checkpoint, eval_before = last_checkpoint(run_dir), logged_eval_before(run_dir)
        if checkpoint is None:
            log.info("No checkpoint in %s yet: starting from step 0", run_dir / CHECKPOINTS)
    if eval_before is None and len(eval_ds):  # a new run, or one killed before its first evaluation was logged
        log.info("Evaluating on %d held-out examples before training", len(eval_ds))
        # Inside train(): an evaluate() call before it marks the model as prepared (for evaluation), and
        # train() then never wraps it in DDP: each process would train alone (accelerate 1.15).
        trainer.args.eval_on_start = True
    return Job(cfg, run_dir, state, device, source, model, tokenizer, trainer, data, eval_ds, eval_conv, checkpoint,
               eval_before, warnings)


def _training_data(cfg: Config, train_conv, eval_conv, tokenizer, data: DataReport):
    """What the method's trainer reads: tokenized examples (sft), prompts with references (grpo: no
    held-out loss, its evaluation is the verified accuracy), prompt/chosen/rejected pairs (dpo)."""
    method = cfg.train.method
    if method == "sft":
        return tokenize_splits(train_conv, eval_conv, tokenizer, cfg.data, data)
    data.eval_examples = len(eval_conv)
    if method == "grpo":
        problems, data.left_out_unchecked = grpo_problems(train_conv)
        data.train_examples = len(problems)
        return problems, []
    data.train_examples = len(train_conv)
    return dpo_pairs(train_conv, "train"), dpo_pairs(eval_conv, "eval")


def _load_base(cfg: Config, source: ModelSource, device: str, state: PartialState, chat: bool):
    """The base model and tokenizer, ready to train: a chat template unless the data is plain text
    (`chat`), no KV cache (training needs none, and packed rows are kept apart only without one)."""
    started = time.perf_counter()
    with state.main_process_first():  # a GGUF file is converted by rank 0 alone; the others read its cache
        model, tokenizer, source = load_model(cfg.model, source, device)
    if chat:
        ensure_chat_template(tokenizer, cfg.model.chat_template)
    model.config.use_cache = False
    log.info("Loaded %s%s in %.1f s", source.path, " (cached conversion)" if source.cache_hit else "",
             time.perf_counter() - started)
    return model, tokenizer, source


def fit(job: Job) -> Fit:
    """Train (Ctrl-C, SIGTERM, SIGHUP: checkpoint, resume hint, exit 128 + signal), then take the held-out loss."""
    trainer, checkpoint = job.trainer, job.checkpoint
    start_step = int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint else 0
    started = time.perf_counter()
    interrupt = GracefulInterrupt()
    trainer.add_callback(interrupt)
    with interrupt.installed():
        try:
            result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) met more than tensors
            raise MathtuneError(f"{checkpoint}: refused to load it: a file in it holds Python objects, not only tensors "
                                f"({str(exc).splitlines()[0]}). Delete that folder to resume from an earlier "
                                "checkpoint.") from None
    if interrupt.stopped_at is not None:  # Ctrl-C, SIGTERM, SIGHUP: exit status 128 + the signal
        raise interrupt.error(last_checkpoint(job.run_dir), job.run_dir)
    seconds = time.perf_counter() - started
    eval_before = job.eval_before if job.eval_before is not None else first_eval_loss(trainer, start_step)
    return Fit(seconds, start_step, result.training_loss, eval_before, _eval_loss(trainer, job.eval_ds))


def finish(job: Job, fitted: Fit) -> TrainResult:
    """Save the adapter and train_summary.json, then (rank 0) evaluate and write the report."""
    cfg, run_dir, main_process = job.cfg, job.run_dir, job.state.is_main_process
    summary = run_summary(job, fitted)
    sharded = distributed.shards_parameters()
    if sharded:
        # Each process holds a slice of the weights: all of them gather, rank 0 writes.
        save_adapter(job.model, job.tokenizer, run_dir / ADAPTER, trainer=job.trainer, write=main_process)
    distributed.leave_process_group(job.state)
    model = job.model if sharded else without_autocast(job.model)
    if main_process:
        if not sharded:
            save_adapter(model, job.tokenizer, run_dir / ADAPTER)
        write_json(run_dir / SUMMARY, summary)
        log.info(summary_text(summary, run_dir))
        if cfg.eval.at_end and sharded:
            log.info("Generation needs the whole model in one process: score the run with `mathtune eval %s "
                     "--base` on one GPU", run_dir)
        elif cfg.eval.at_end and job.data.text:
            log.info("Plain-text data has no questions to answer: the verified-accuracy evaluation is skipped; the "
                     "held-out loss above is its evaluation (perplexity %s -> %s)", summary["eval_perplexity_before"],
                     summary["eval_perplexity_after"])
        elif cfg.eval.at_end:
            # Other ranks have finished; the adapter is whole in this process (DDP keeps a full copy).
            # Scoring needs a fraction of the heap that training left behind: hand the rest back first.
            hardware.release_freed_memory()
            held_out, benches = evaluate_held_out(cfg, model, job.tokenizer, run_dir, job.eval_conv)
            log_final(job.trainer, accuracies(held_out, benches))
        log.info("Report: %s", write_report(run_dir))
    return TrainResult(run_dir, summary, model, job.tokenizer)


@contextmanager
def starting_adapter(model, path: Path):
    """The adapter a run started from (model.adapter), active in place of the trained one."""
    model.load_adapter(str(path), adapter_name="start")
    trained = model.active_adapter
    model.set_adapter("start")
    try:
        yield
    finally:
        model.set_adapter(trained)
        model.delete_adapter("start")


def without_autocast(model):
    """The trained model as `mathtune eval`, `chat` and the exports reload it: Trainer runs a bf16 or
    fp16 model under accelerate's autocast wrapper (LoRA products in bf16, outputs cast to float32),
    which is removed here, so the end-of-training scores are those of the weights as saved (bf16
    base, float32 LoRA) and `mathtune eval RUN` reproduces them."""
    return extract_model_from_parallel(model, keep_fp32_wrapper=False)


def run_summary(job: Job, fitted: Fit) -> dict[str, Any]:
    """train_summary.json: what was trained, on what, how fast, and the losses before and after."""
    state, data, source = job.trainer.state, job.data, job.source
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    trainable, total = count_parameters(job.model)
    device = job.device
    logger = next(cb for cb in job.trainer.callback_handler.callbacks if isinstance(cb, RunLogger))
    session_tokens = state.num_input_tokens_seen - logger.tokens_at_start
    return {
        "method": job.cfg.train.method,
        "model": {"kind": source.kind, "path": source.path, "loaded_from": source.load_from},
        "started_from_adapter": str(job.cfg.model.adapter) if job.cfg.model.adapter else None,
        "steps": state.global_step,
        "steps_this_session": state.global_step - fitted.start_step,
        "epochs": round(state.epoch or 0.0, 4),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "lora_targets": lora_modules(job.model),
        "train_examples": data.train_examples,
        "eval_examples": data.eval_examples,
        "truncated_examples": data.truncated,
        "dropped_examples": data.dropped_no_labels,
        "left_out_unchecked": data.left_out_unchecked,
        "skipped_invalid_records": data.skipped_invalid,
        "tokens_seen": state.num_input_tokens_seen,
        "train_seconds": round(fitted.seconds, 2),
        "tokens_per_second": round(session_tokens / fitted.seconds, 2) if fitted.seconds else None,
        "precision": precision(job.model, job.trainer.args),
        "dtype": str(_compute_dtype(job.model)).removeprefix("torch."),  # what eval, chat and export reload in
        "first_train_loss": round(losses[0], 6) if losses else None,
        "last_train_loss": round(losses[-1], 6) if losses else None,
        "train_loss_mean": round(fitted.train_loss_mean, 6),
        "eval_loss_before": fitted.eval_before,
        "eval_loss_after": fitted.eval_after,
        "eval_perplexity_before": perplexity(fitted.eval_before),
        "eval_perplexity_after": perplexity(fitted.eval_after),
        "resumed_from": str(job.checkpoint) if job.checkpoint else None,
        "device": device,
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        "processes": job.state.num_processes,
        "engine": distributed.engine() if job.state.num_processes > 1 else None,
        "warnings": job.warnings,
    }


def evaluate_held_out(cfg: Config, model, tokenizer, run_dir: Path, eval_conv) -> tuple[dict, dict[str, dict]]:
    """Base vs fine-tuned verified accuracy on (at most eval.max_examples of) the held-out split,
    then on the benchmarks of eval.bench; a significant drop is repeated at the end as a warning.
    Returns the held-out summary and each benchmark's."""
    examples = eval_examples(eval_conv, cfg.eval.max_examples or None)
    log.info("Scoring base and fine-tuned answers on %d of %d held-out examples", len(examples), len(eval_conv))
    start, versus, baseline = cfg.model.adapter, {}, None
    if start:  # what the run changed: the adapter it started from against the one it ended with
        versus = {"base_label": "start", "baseline": f"the adapter the run started from ({start})"}
        baseline = lambda: starting_adapter(model, start)  # noqa: E731
        log.info("The 'start' column is the adapter the run started from (%s), not the base model", start)
    result = evaluate_model(model, tokenizer, examples, run_dir / EVAL, base=True,
                            max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
                            max_seq_length=cfg.data.max_seq_length, meta={"data": "run", "split": "eval", **versus},
                            baseline=baseline)
    log.info("\n%s", comparison_table(result))
    benches = run_benches(cfg, model, tokenizer, run_dir, cfg.eval.bench, limit=cfg.eval.bench_limit,
                          baseline=baseline, meta=versus)
    if not cfg.eval.bench:
        log.info("General math was not checked (eval.bench is off: minutes on a CPU). Base vs fine-tuned on "
                 "GSM8K: mathtune eval %s --bench gsm8k [--limit 100]", run_dir)
    warn_about_drops({"the held-out split": result, **benches})
    return result, benches


# ---------------------------------------------------------------------------------------------
# Saving


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (see mathtune.train.checkpoints)."""
    return newest_complete_checkpoint(run_dir / CHECKPOINTS)


# ---------------------------------------------------------------------------------------------
# Trainer


def build_trainer(cfg: Config, model, tokenizer, train_ds, eval_ds, run_dir: Path, device: str, main_process: bool):
    """The method's Trainer: transformers' for SFT, TRL's for GRPO and DPO."""
    lean_blocks(model)  # norms and gated MLPs that keep less for the backward pass (mathtune/train/blocks.py)
    if cfg.train.method == "grpo":
        return build_grpo_trainer(cfg, model, tokenizer, train_ds, run_dir, device, _compute_dtype(model), main_process)
    if cfg.train.method == "dpo":
        return build_dpo_trainer(cfg, model, tokenizer, train_ds, eval_ds, run_dir, device, _compute_dtype(model),
                                 main_process)
    packed = cfg.train.padding_free and supports_padding_free(model)
    loss = label_only_loss
    if packed:
        # One row per batch, positions restarting at each example: no padding to compute on,
        # attention computed per example, and the output layer run only where there is a label,
        # fused with the loss where it can be (mathtune/train/loss.py).
        keep_logits = "logits_to_keep" in inspect.signature(model.get_base_model().forward).parameters
        collator = packed_collator(boundaries=use_packed_attention(model), keep_logits=keep_logits)
        head = fusable_output_layer(model) if keep_logits else None
        loss = OutputLayerLoss(head) if head is not None else label_only_loss
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    log.info("Batches: %s", "packed without padding" if packed else "padded to the longest example")
    args = training_arguments(cfg, run_dir, device, _compute_dtype(model), packed, has_eval=len(eval_ds) > 0)
    log.info("Precision: %s", precision(model, args))
    trainer = RunTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds if len(eval_ds) else None,
        data_collator=collator,
        processing_class=tokenizer,
        compute_loss_func=loss,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(RunLogger(run_dir / METRICS, show_progress=main_process, write=main_process))
    return trainer


def training_arguments(cfg: Config, run_dir: Path, device: str, dtype, packed: bool, has_eval: bool):
    t = cfg.train
    return TrainingArguments(
        **shared_arguments(cfg, run_dir, device, dtype),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        eval_strategy="steps" if t.eval_steps and has_eval else "no",
        eval_steps=t.eval_steps or None,
        # Packed batches have no padding (and no attention mask to tell it by): count every token.
        include_num_input_tokens_seen="all" if packed else "non_padding",
        prediction_loss_only=True,
        remove_unused_columns=False,
    )


class RunTrainer(SafeTrainingMixin, OutputLayerLossMixin, Trainer):
    """transformers' Trainer with whole checkpoints and a stop on a non-finite loss (mathtune/train/checkpoints.py),
    and the output layer fused with the loss (mathtune/train/loss.py)."""


def precision(model, args) -> str:
    """What the matrix products run in, for the log and train_summary.json: "float32", or
    "bf16 autocast, bfloat16 weights" (the frozen base in bf16; LoRA weights and optimizer in float32)."""
    weights = str(_compute_dtype(model)).removeprefix("torch.")
    if args.bf16 or args.fp16:
        return f"{'bf16' if args.bf16 else 'fp16'} autocast, {weights} weights"
    return weights


def _compute_dtype(model):
    """The dtype the matrix products run in: a 4-bit base computes in its bnb compute dtype (its
    other weights are float32 after prepare_model_for_kbit_training), any other in its weights' dtype."""
    quant = getattr(model.config, "quantization_config", None)
    compute = quant.get("bnb_4bit_compute_dtype") if isinstance(quant, dict) else getattr(quant, "bnb_4bit_compute_dtype", None)
    if compute is not None and getattr(model, "is_loaded_in_4bit", False):
        return getattr(torch, compute) if isinstance(compute, str) else compute
    return next(p.dtype for p in model.parameters())


def _eval_loss(trainer, eval_ds) -> float | None:
    if not len(eval_ds):
        return None
    loss = trainer.evaluate()["eval_loss"]
    if not math.isfinite(loss):
        raise MathtuneError(f"evaluation loss is {loss}: the model or data produce non-finite values")
    return round(loss, 6)


