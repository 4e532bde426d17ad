"""Training throughput and memory: mathtune against plain Transformers + PEFT, in one invocation.

    .venv/bin/python benchmarks/train_throughput.py --quick      # tiny random llama, ~1.5 minutes on 2 cores
    .venv/bin/python benchmarks/train_throughput.py              # SmolLM2-135M, GSM8K train, batch 8 x 512
    .venv/bin/python benchmarks/train_throughput.py --profile    # and the top operators of one step of each
    .venv/bin/python benchmarks/train_throughput.py --device cuda    # bf16, plus peak GPU memory and MFU

The same job runs in each row, each in its own child process (so each has its own peak memory):

- mathtune: mathtune's own path (load_model, chat-template tokenization with assistant-only labels,
  apply_lora, build_trainer: packed batches without padding, loss only at label positions), in the
  precision `model.dtype: auto` picks on this machine (bf16 on a CPU with bf16 units; --dtype forces one);
- reference: written the way the Transformers/PEFT docs show it: AutoModelForCausalLM +
  get_peft_model, prompt tokens masked with -100, DataCollatorForSeq2Seq padded batches, Trainer with
  the model's own full-vocabulary loss; float32 on a CPU, bf16 on CUDA;
- reference bf16 (CPU): the same with `TrainingArguments(bf16=True)`, what a user who knows their CPU
  has bf16 units would try. Run where the CPU has them (--reference-bf16 yes runs it anywhere).

Same model folder, examples (in the same order: same dataset, same sampler seed), maximum length,
batch, LoRA (r, alpha, all linear layers), optimizer, learning-rate schedule, steps and seed. Printed
for each: real (non-padding) tokens/s over the steps after the warm-up, peak resident memory of the
process, and the loss after the last step on held-out examples, computed the same plain way for
both (mean over the answer tokens); then the ratios mathtune / reference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import gigabytes, wait_with_peak_rss  # benchmarks/, beside this script

ROOT = Path(__file__).resolve().parents[1]
GSM8K_TRAIN = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
TOOLS = ("mathtune", "reference", "reference-bf16")
NAMES = {"mathtune": "mathtune", "reference": "reference (Trainer+PEFT)", "reference-bf16": "reference bf16=True"}

# Dense bf16 peak of common GPUs (TFLOP/s), for model FLOPs utilisation; --peak-tflops overrides.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                    "4090": 165.0, "3090": 71.0}


# ---------------------------------------------------------------------------------------------
# Measures shared by both tools


def throughput(marks: list[list[float]], warmup: int) -> float:
    """Tokens/s between the end of step `warmup` and the last step; marks[i] = (seconds, tokens) after step i."""
    (t0, n0), (t1, n1) = marks[warmup], marks[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


def median_step_throughput(marks: list[list[float]], warmup: int) -> float:
    """The median of each timed step's own tokens/s: robust to another process taking the cores for a while."""
    import statistics

    rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(marks[warmup:], marks[warmup + 1:]) if b[0] > a[0]]
    return statistics.median(rates) if rates else 0.0


def model_flops_utilisation(params: int, tokens_per_second: float, peak_tflops: float | None) -> float | None:
    """Useful model FLOPs (6 x parameters per real token, the PaLM convention) over the device's peak."""
    if not peak_tflops:
        return None
    return 6 * params * tokens_per_second / (peak_tflops * 1e12)


def peak_tflops_for(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def held_out_loss(model, tokenizer, conversations: list[list[dict]], max_seq_length: int) -> float:
    """Plain loss (full-vocabulary logits, mean over the answer tokens) of each held-out example alone,
    in float32 whatever precision the row trained in: the trained weights are compared, not the
    precision of this evaluation."""
    import torch

    from mathtune.data.tokenize import IGNORE_INDEX, tokenize_conversation

    device = next(model.parameters()).device
    model.float().eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for messages in conversations:
            row = tokenize_conversation(messages, tokenizer, max_seq_length)
            labels = torch.tensor([row["labels"]], device=device)
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            if n:
                out = model(input_ids=torch.tensor([row["input_ids"]], device=device), labels=labels)
                total, count = total + out.loss.float().item() * n, count + n
    return total / max(count, 1)


def _step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """(seconds, tokens seen) at the start and after every optimizer step."""

        def __init__(self, cuda: bool):
            self.cuda, self.marks = cuda, []

        def _mark(self, state):
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.marks.append([time.perf_counter(), state.num_input_tokens_seen])

        def on_train_begin(self, args, state, control, **kwargs):
            self._mark(state)

        def on_step_end(self, args, state, control, **kwargs):
            self._mark(state)

    return StepClock


def _step_profiler():
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        """torch.profiler over one optimizer step (the first timed one): its top operators by own time."""

        def __init__(self, step: int, rows: int = 15):
            self.step, self.rows, self.profiler, self.table = step, rows, None, None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                from torch.profiler import ProfilerActivity, profile

                self.profiler = profile(activities=[ProfilerActivity.CPU])
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                self.table = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=self.rows,
                                                                max_name_column_width=40)
                self.profiler = None

    return StepProfiler


def _first_step_products():
    from matrix_ceiling import ProductRecorder
    from transformers import TrainerCallback

    class FirstStepProducts(TrainerCallback):
        """The matrix products of the first optimizer step (a warm-up step, not timed)."""

        def __init__(self):
            self.recorder = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                self.recorder = ProductRecorder()
                self.recorder.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                self.recorder.__exit__(None, None, None)

    return FirstStepProducts


def train_and_measure(trainer, model, tokenizer, spec: dict, load_seconds: float, ceiling: bool = False) -> dict:
    """Train, then everything the table needs, as a JSON-ready dict."""
    import torch

    cuda = spec["device"] == "cuda"
    clock = _step_clock()(cuda)
    trainer.add_callback(clock)
    profiler = _step_profiler()(spec["warmup"]) if spec["profile"] else None
    if profiler:
        trainer.add_callback(profiler)
    first_step = _first_step_products()() if ceiling else None
    if first_step:
        trainer.add_callback(first_step)
    lora_a = [p.detach().double().sum().item() for n, p in model.named_parameters() if "lora_A" in n]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    precision = _precision(model, trainer.args)
    tokens = [b[1] - a[1] for a, b in zip(clock.marks, clock.marks[1:])]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    eval_conv = [json.loads(line)["messages"] for line in Path(spec["eval_file"]).read_text().splitlines()]
    state = trainer.optimizer.state.values()
    matrix = _matrix_ceiling(first_step.recorder.products, tokens[0]) if first_step else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "tokens_per_second": throughput(clock.marks, spec["warmup"]),
        "median_step_tokens_per_second": median_step_throughput(clock.marks, spec["warmup"]),
        "seconds_per_step": (clock.marks[-1][0] - clock.marks[spec["warmup"]][0]) / max(len(tokens) - spec["warmup"], 1),
        "step_tokens": tokens,
        "train_losses": losses,
        "held_out_loss": held_out_loss(model, tokenizer, eval_conv, spec["max_seq_length"]),
        "load_seconds": load_seconds,
        "lora_init": round(sum(lora_a), 6),
        "trainable": trainable,
        "parameters": sum(p.numel() for p in model.parameters()),
        "optimizer_floats": sum(t.numel() for s in state for t in s.values() if torch.is_tensor(t) and t.dim()),
        "threads": torch.get_num_threads(),
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "precision": precision,
        "profile": profiler.table if profiler else None,
        "matrix_ceiling": matrix,
    }


def _matrix_ceiling(products, tokens: int) -> dict:
    from matrix_ceiling import matrix_ceiling

    return matrix_ceiling(products, tokens)


def _precision(model, args) -> str:
    from mathtune.train.recipe import precision

    return precision(model, args)


# ---------------------------------------------------------------------------------------------
# The two tools (each runs in a child process: `--worker TOOL`)


def run_mathtune(spec: dict) -> dict:
    from transformers import set_seed

    from mathtune.config import load_config
    from mathtune.data.dataset import DataReport, load_conversations
    from mathtune.data.tokenize import ensure_chat_template, tokenize_dataset
    from mathtune.model.load import load_model
    from mathtune.train.lora import apply_lora
    from mathtune.train.recipe import build_trainer

    h = spec["hyper"]
    cfg = load_config(overrides={
        "model.path": spec["model_path"], "model.cache_dir": spec["cache_dir"], "model.device": spec["device"],
        "model.dtype": spec["mathtune_dtype"], "data.max_seq_length": spec["max_seq_length"],
        "lora.r": h["r"], "lora.alpha": h["alpha"], "train.max_steps": spec["steps"],
        "train.batch_size": spec["batch_size"], "train.learning_rate": h["learning_rate"],
        "train.lr_scheduler": h["lr_scheduler"], "train.warmup_ratio": h["warmup_ratio"],
        "train.optimizer": h["optimizer"], "train.seed": spec["seed"], "train.logging_steps": 1,
        "train.save_steps": spec["steps"] + 1, "train.padding_free": not spec["no_packing"],
    })
    started = time.perf_counter()
    model, tokenizer, _ = load_model(cfg.model)
    load_seconds = time.perf_counter() - started
    ensure_chat_template(tokenizer, cfg.model.chat_template)
    model.config.use_cache = False  # as train() does
    train_ds = tokenize_dataset(load_conversations([Path(spec["train_file"])], cfg.data, DataReport()), tokenizer,
                                cfg.data, DataReport())
    set_seed(spec["seed"])
    model = apply_lora(model, cfg.lora, gradient_checkpointing=cfg.train.gradient_checkpointing)
    trainer = build_trainer(cfg, model, tokenizer, train_ds, [], Path(spec["work"]) / "mathtune", spec["device"],
                            main_process=False)
    # The ceiling needs an untimed first step to record; on CUDA the MFU column stands for it.
    ceiling = spec["device"] == "cpu" and spec["warmup"] >= 1
    return train_and_measure(trainer, model, tokenizer, spec, load_seconds, ceiling=ceiling)


def run_reference(spec: dict, bf16: bool = False) -> dict:
    """The Transformers + PEFT documentation recipe, nothing added (with `bf16`: TrainingArguments(bf16=True))."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    h = spec["hyper"]
    dtype = getattr(torch, spec["dtype"])
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_folder"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_folder"], dtype=dtype).to(spec["device"])
    load_seconds = time.perf_counter() - started

    def tokenize(example):
        # Prompt = everything before the last answer; its tokens get label -100.
        prompt = tokenizer.apply_chat_template(example["messages"][:-1], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(example["messages"], tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][: spec["max_seq_length"]]
        labels = ([-100] * len(prompt_ids) + ids[len(prompt_ids):])[: len(ids)]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    train_ds = load_dataset("json", data_files=spec["train_file"], split="train")
    train_ds = train_ds.map(tokenize, remove_columns=train_ds.column_names)

    set_seed(spec["seed"])
    lora = LoraConfig(r=h["r"], lora_alpha=h["alpha"], lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    args = TrainingArguments(
        output_dir=str(Path(spec["work"]) / "reference"),
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["batch_size"],
        learning_rate=h["learning_rate"],
        lr_scheduler_type=h["lr_scheduler"],
        warmup_steps=h["warmup_ratio"],
        optim=h["optimizer"],
        logging_steps=1,
        save_strategy="no",
        seed=spec["seed"],
        data_seed=spec["seed"],
        bf16=bf16 or (spec["device"] == "cuda" and dtype == torch.bfloat16),
        use_cpu=spec["device"] == "cpu",
        include_num_input_tokens_seen="non_padding",
        report_to=[],
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_ds,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True), processing_class=tokenizer)
    return train_and_measure(trainer, model, tokenizer, spec, load_seconds)


def worker(tool: str, spec_path: Path, result_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    if spec["threads"]:
        import torch

        torch.set_num_threads(spec["threads"])
    run = {"mathtune": run_mathtune, "reference": run_reference,
           "reference-bf16": lambda s: run_reference(s, bf16=True)}[tool]
    result = run(spec)
    result["onednn_kernel_cache"] = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    result["ideep_kernel_cache"] = os.environ.get("LRU_CACHE_CAPACITY")
    result_path.write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# The orchestrating process


def prepare(args, work: Path) -> dict:
    """The model folder both tools load, and the train / held-out examples both see."""
    from mathtune.config import Config, DataConfig, ModelConfig, resolve_optimizer
    from mathtune.data.builtin import builtin_files
    from mathtune.data.dataset import DataReport, load_conversations
    from mathtune.hardware import cpu_bf16_units
    from mathtune.model.cache import convert_gguf
    from mathtune.model.load import embedded_model_path, resolve_source

    cache = Path(args.cache_dir) if args.cache_dir else None
    if args.model in ("smollm2", "tiny"):
        smollm, _ = convert_gguf(embedded_model_path(), _cache_root(cache))
        model_path, folder = (str(embedded_model_path()), smollm) if args.model == "smollm2" else (None, None)
        if args.model == "tiny":
            folder = model_path = str(build_tiny_llama(smollm, work / "tiny-llama", args.seed))
        name = "SmolLM2-135M-Instruct" if args.model == "smollm2" else "tiny random llama (SmolLM2 tokenizer)"
    else:
        source = resolve_source(ModelConfig(path=args.model))
        folder = convert_gguf(Path(source.path), _cache_root(cache))[0] if source.kind == "gguf" else source.load_from
        model_path, name = args.model, Path(args.model).name

    files = {"gsm8k": [GSM8K_TRAIN], "bundled": builtin_files()}.get(args.data, [Path(args.data)])
    if not all(f.is_file() for f in files):
        raise SystemExit(f"{files[0]}: no such file; name the GSM8K train.jsonl (or any dataset file) with --data FILE")
    conversations = load_conversations(files, DataConfig(files=files), DataReport()).shuffle(seed=args.seed)
    need = args.steps * args.batch_size + args.eval_examples
    if len(conversations) < need:
        raise SystemExit(f"{args.data}: {len(conversations)} records, the run needs {need}")
    for split, rows in (("train", range(need - args.eval_examples)), ("eval", range(need - args.eval_examples, need))):
        with (work / f"{split}.jsonl").open("w", encoding="utf-8") as fh:
            for messages in conversations.select(rows)["messages"]:
                fh.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    defaults = Config()
    return {
        "model_name": name, "model_path": model_path, "model_folder": folder, "cache_dir": args.cache_dir,
        "data_name": _data_name(args.data, files),
        "train_file": str(work / "train.jsonl"), "eval_file": str(work / "eval.jsonl"), "work": str(work),
        "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length, "seed": args.seed, "device": args.device, "threads": args.threads,
        "dtype": "bfloat16" if args.device == "cuda" else "float32", "no_packing": args.no_packing,
        "mathtune_dtype": args.dtype, "profile": args.profile, "cpu_kernels": _cpu_kernels(),
        "cpu_bf16": cpu_bf16_units(),
        "hyper": {"r": defaults.lora.r, "alpha": defaults.lora.alpha, "learning_rate": defaults.train.learning_rate,
                  "lr_scheduler": defaults.train.lr_scheduler, "warmup_ratio": defaults.train.warmup_ratio,
                  "optimizer": resolve_optimizer(defaults)},
    }


def _cpu_kernels() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def _data_name(data: str, files: list[Path]) -> str:
    if data == "bundled":
        return "bundled math set"
    return f"GSM8K {files[0].stem}" if files[0].parent.name == "gsm8k" else str(files[0])


def _cache_root(cache: Path | None) -> Path:
    from mathtune.files import cache_root

    return cache_root(cache)


def build_tiny_llama(tokenizer_folder: str, folder: Path, seed: int) -> Path:
    """A 4-layer, 64-wide llama with SmolLM2's tokenizer and tied embeddings, random weights."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_child(tool: str, spec: dict, work: Path) -> dict:
    """One tool in its own process; its peak resident memory comes from the kernel (wait4)."""
    spec_path, result_path = work / "spec.json", work / f"{tool}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    if tool != "mathtune":
        # The reference rows prepare their data with mathtune.data, and importing mathtune bounds
        # oneDNN's and ideep's kernel caches (mathtune/__init__.py); they run with the defaults, as
        # a plain Transformers process does.
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = env["LRU_CACHE_CAPACITY"] = "1024"
    started = time.perf_counter()
    # The children's progress goes to stderr: stdout is the table.
    proc = subprocess.Popen([sys.executable, __file__, "--worker", tool, str(spec_path), str(result_path)], env=env,
                            stdout=sys.stderr)
    peak = wait_with_peak_rss(proc)
    if proc.returncode != 0:
        raise SystemExit(f"{tool}: the benchmark process failed (exit status {proc.returncode}); its output is above")
    result = json.loads(result_path.read_text())
    result["peak_rss_bytes"] = peak
    result["wall_seconds"] = time.perf_counter() - started
    return result


def table(spec: dict, results: dict, peak_tflops: float | None) -> str:
    m, r = results["mathtune"], results["reference"]
    warm, last = spec["warmup"], 3
    h = spec["hyper"]
    cuda = spec["device"] == "cuda"
    head = (f"{spec['model_name']}, {spec['data_name']}, batch {spec['batch_size']}, max length "
            f"{spec['max_seq_length']}, {spec['steps']} steps ({warm} warm-up, not timed), LoRA r={h['r']} "
            f"alpha={h['alpha']:g} all linear layers, {h['optimizer']} lr {h['learning_rate']:g} {h['lr_scheduler']}, "
            f"{m['device_name']}, {m['threads']} threads")
    cpu = (f"CPU: {spec['cpu_kernels']} kernels, bf16 units: {spec['cpu_bf16'] or 'none'}; mathtune trains in "
           f"{m['precision']}" + ("" if spec["mathtune_dtype"] == "auto" else f" (--dtype {spec['mathtune_dtype']})"))
    cols = ["precision", "real tokens/s", "median step", "peak RSS GB", "held-out loss", "train loss*", "s/step"]
    if cuda:
        cols += ["peak GPU GB", "MFU"]

    def row(res):
        cells = [res["precision"], f"{res['tokens_per_second']:.1f}", f"{res['median_step_tokens_per_second']:.1f}",
                 gigabytes(res["peak_rss_bytes"]), f"{res['held_out_loss']:.4f}",
                 f"{sum(res['train_losses'][-last:]) / len(res['train_losses'][-last:]):.4f}",
                 f"{res['seconds_per_step']:.2f}"]
        if cuda:
            mfu = model_flops_utilisation(res["parameters"], res["tokens_per_second"], peak_tflops)
            cells += [f"{res['cuda_peak_bytes'] / 1e9:.2f}", f"{100 * mfu:.1f}%" if mfu is not None else "n/a"]
        return cells

    def ratio(other):
        cells = ["", f"{m['tokens_per_second'] / other['tokens_per_second']:.2f}x",
                 f"{m['median_step_tokens_per_second'] / other['median_step_tokens_per_second']:.2f}x",
                 f"{m['peak_rss_bytes'] / other['peak_rss_bytes']:.2f}x" if m["peak_rss_bytes"] else "n/a",
                 f"{m['held_out_loss'] / other['held_out_loss']:.3f}x", "",
                 f"{m['seconds_per_step'] / other['seconds_per_step']:.2f}x"]
        if cuda:
            cells += [f"{m['cuda_peak_bytes'] / other['cuda_peak_bytes']:.2f}x", ""]
        return cells

    rows = [("", cols)] + [(NAMES[tool], row(results[tool])) for tool in TOOLS if tool in results]
    rows += [(f"mathtune / {NAMES[tool].split(' (')[0]}", ratio(results[tool])) for tool in TOOLS[1:] if tool in results]
    width = [max(len(cells[i]) for _, cells in rows) for i in range(len(cols))]
    lines = [head, cpu, ""] + [f"{name:<30}" + "  ".join(c.rjust(w) for c, w in zip(cells, width)) for name, cells in rows]
    if "reference-bf16" not in results and not cuda:
        why = "this CPU has bf16 units, but --reference-bf16 no" if spec["cpu_bf16"] else "this CPU has no bf16 units"
        lines.append(f"{NAMES['reference-bf16']}: not run, {why} (--reference-bf16 yes runs it)")
    same_tokens = all(res["step_tokens"] == m["step_tokens"] for res in results.values())
    same_init = all(res["lora_init"] == m["lora_init"] for res in results.values())
    lines += [
        "",
        "real tokens/s: non-padding tokens of the timed steps over their wall time; median step: the median of "
        "each timed step's own rate (less sensitive to other processes on the machine).",
        f"* mean training loss of the last {last} steps; each tool's own labels (the reference also trains on the "
        "newline after each end-of-turn token), so compare the held-out loss.",
        f"held-out loss: after the last step, {spec['eval_examples']} examples not trained on, the plain "
        "full-vocabulary loss per answer token, computed the same way (in float32) for every row.",
        f"same real tokens in every step: {'yes' if same_tokens else 'NO'} ({sum(m['step_tokens']):,} tokens in "
        f"{len(m['step_tokens'])} steps); same initial LoRA weights: "
        + ("yes" if same_init else "NO (sum of the A matrices: " + ", ".join(
            f"{NAMES[tool].split(' (')[0]} {res['lora_init']}" for tool, res in results.items()) + ")")
        + f"; trainable parameters: {m['trainable']:,} / {r['trainable']:,}",
        f"optimizer state: {m['optimizer_floats'] / m['trainable']:.2f} / {r['optimizer_floats'] / r['trainable']:.2f} "
        "floats per trainable parameter (AdamW keeps 2: state for the trainable parameters only)",
        f"model load: mathtune {m['load_seconds']:.2f} s"
        + (" (GGUF, cached conversion)" if str(spec["model_path"]).endswith(".gguf") else "")
        + f", reference {r['load_seconds']:.2f} s (from the converted folder)",
    ]
    if m.get("matrix_ceiling"):
        from matrix_ceiling import describe

        lines.append(describe(m["matrix_ceiling"], m["tokens_per_second"]))
    for tool in TOOLS:
        if results.get(tool, {}).get("profile"):
            lines += ["", f"{NAMES[tool]}: one step (step {warm + 1}) under torch.profiler, top operators by own time",
                      results[tool]["profile"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1], Path(argv[2]), Path(argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny random llama (defaults to --model tiny)")
    parser.add_argument("--model", help="smollm2 (default), tiny, or a .gguf file / Transformers folder")
    parser.add_argument("--data", default="gsm8k", help="gsm8k (default: ../shared/data/gsm8k/train.jsonl), bundled, or a file")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--eval-examples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in both tools (0: torch's default)")
    parser.add_argument("--no-packing", action="store_true", help="mathtune with padded batches (to measure packing)")
    parser.add_argument("--cache-dir", help="GGUF conversion cache (default: $MATHTUNE_CACHE or ~/.cache/mathtune)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU (default: from its name)")
    parser.add_argument("--json", type=Path, help="also write every measured figure here")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="mathtune's model.dtype (auto: bf16 on a CPU with bf16 units, float32 elsewhere)")
    parser.add_argument("--reference-bf16", choices=["auto", "yes", "no"], default="auto",
                        help="the third row, the reference with bf16=True (auto: on a CPU with bf16 units)")
    parser.add_argument("--profile", action="store_true", help="print the top operators of one timed step of each row")
    args = parser.parse_args(argv)
    args.model = args.model or ("tiny" if args.quick else "smollm2")
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be at least 0 and below --steps")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")

    with tempfile.TemporaryDirectory(prefix="mathtune-bench-") as tmp:
        work = Path(tmp)
        spec = prepare(args, work)
        spec["eval_examples"] = args.eval_examples
        results = {}
        third = {"yes": True, "no": False}.get(args.reference_bf16, bool(spec["cpu_bf16"]))
        for tool in TOOLS if third and args.device == "cpu" else TOOLS[:2]:
            print(f"[train_throughput] {tool}: {spec['model_name']}, {spec['steps']} steps ...", file=sys.stderr, flush=True)
            results[tool] = run_child(tool, spec, work)
    peak = args.peak_tflops or peak_tflops_for(results["mathtune"]["device_name"])
    print(table(spec, results, peak))
    if args.json:
        args.json.write_text(json.dumps({"spec": spec, "results": results}, indent=2))


if __name__ == "__main__":
    main()
