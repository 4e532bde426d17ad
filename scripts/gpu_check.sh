#!/usr/bin/env bash
# Check mathtune's CUDA paths on a GPU machine, offline, in under 5 minutes:
#
#   bash scripts/gpu_check.sh                 # uses .venv/bin/python if present, else python3
#   PYTHON=/path/to/python bash scripts/gpu_check.sh
#
# Needs torch (a CUDA build), transformers, peft, accelerate and mathtune's dependencies; no network
# and no downloaded model: a small llama (4 layers, width 256) and its tokenizer are built here, and
# the data is the bundled math set. Steps, each reported OK / FAILED / SKIPPED:
#   1. environment: torch, CUDA, GPU, bf16, bitsandbytes
#   2. LoRA in bf16: 40 steps, then base vs fine-tuned verified accuracy (eval.at_end)
#   3. QLoRA: 4-bit NF4 base with double quantization, bf16 compute, gradient checkpointing, paged
#      8-bit AdamW (train.optimizer: auto) -- only if bitsandbytes imports
#   4. mathtune eval of the bf16 run, base vs fine-tuned
#   5. mathtune export of the bf16 run -- only if this mathtune has the export command
#   6. DDP on 2 GPUs with torchrun -- only if there are 2 or more
#   7. the tests marked gpu (pytest -m gpu) -- only if pytest is installed
# Steps 2, 3 and 6 print tokens/s and peak GPU memory. Exit status 0 when every step that ran passed;
# without a usable CUDA GPU it stops at step 1 with status 2 and says why.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mathtune-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MATHTUNE_CACHE="$WORK/cache"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0
started=$SECONDS

step() { printf '\n== %s\n' "$*"; }
result() {  # result NAME STATUS
  if [ "$2" -eq 0 ]; then echo "-- $1: OK"; else echo "-- $1: FAILED (status $2)"; failed=1; fi
}

cat > "$WORK/check.py" <<'PYEOF'
"""Helpers of scripts/gpu_check.sh: environment, a small llama, a training run with its figures."""
import json
import sys
import time
from pathlib import Path


def environment() -> int:
    import torch

    print(f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none (CPU-only build)'}")
    if not torch.cuda.is_available():
        why = ("this torch is a CPU-only build; install a CUDA one, e.g. pip install --force-reinstall torch "
               "--index-url https://download.pytorch.org/whl/cu128") if torch.version.cuda is None else (
               "torch has CUDA but sees no GPU: check the driver (nvidia-smi) and CUDA_VISIBLE_DEVICES")
        print(f"gpu_check: no usable CUDA GPU: {why}")
        return 2
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability {props.major}.{props.minor}")
    print(f"bf16 supported: {torch.cuda.is_bf16_supported()}")
    try:
        import bitsandbytes

        print(f"bitsandbytes {bitsandbytes.__version__}")
    except Exception as exc:  # noqa: BLE001 - any import failure means: no QLoRA here
        print(f"bitsandbytes: not importable ({exc.__class__.__name__}: {exc}); QLoRA is skipped")
    import accelerate
    import peft
    import transformers

    print(f"transformers {transformers.__version__}, peft {peft.__version__}, accelerate {accelerate.__version__}")
    return 0


def build_model(folder: str) -> int:
    """A llama with 4 layers of width 256 and a byte-level BPE trained on the bundled math set."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import mathtune.data.builtin

    builtin = Path(mathtune.data.builtin.__file__).parent
    texts = [line for path in sorted(builtin.glob("*.jsonl")) for line in path.read_text(encoding="utf-8").splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=2048, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"small llama: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocabulary {len(tokenizer)}")
    return 0


def run(model_dir: str, out: str, *settings: str) -> int:
    """mathtune train in this process; prints tokens/s and peak GPU memory."""
    import torch

    from mathtune.config import load_config, parse_override
    from mathtune.train.recipe import train

    overrides = {"model.path": model_dir, "model.device": "cuda", "data.max_seq_length": 256,
                 "train.max_steps": 40, "train.batch_size": 8, "train.learning_rate": 2e-3, "train.logging_steps": 10,
                 "train.save_steps": 20, "eval.max_examples": 16, "eval.max_new_tokens": 48, "output.dir": out}
    overrides.update(dict(parse_override(text) for text in settings))
    cfg = load_config(overrides=overrides)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    summary = train(cfg).summary
    print(f"RESULT {Path(out).name}: {summary['tokens_per_second']:.0f} tokens/s, peak GPU memory "
          f"{torch.cuda.max_memory_allocated() / 2**30:.3f} GiB (training alone {summary['peak_gpu_memory_gb']} GiB), "
          f"eval loss {summary['eval_loss_before']} -> {summary['eval_loss_after']}, {time.perf_counter() - started:.0f} s")
    if not summary["eval_loss_after"] < summary["eval_loss_before"]:
        print("gpu_check: the eval loss did not go down")
        return 1
    return 0


def ddp_summary(run_dir: str) -> int:
    summary = json.loads((Path(run_dir) / "train_summary.json").read_text())
    print(f"RESULT ddp: {summary['processes']} processes, {summary['tokens_per_second']:.0f} tokens/s (all GPUs), "
          f"peak GPU memory of rank 0 {summary['peak_gpu_memory_gb']} GiB")
    return 0 if summary["processes"] >= 2 else 1


if __name__ == "__main__":
    from mathtune.cli import _setup_logging

    _setup_logging(verbose=False)
    sys.exit(globals()[sys.argv[1]](*sys.argv[2:]))
PYEOF

step "1. environment"
"$PY" "$WORK/check.py" environment
status=$?
if [ $status -ne 0 ]; then
  echo "-- environment: FAILED; nothing else can run without a CUDA GPU"
  exit 2
fi
has_bnb=$("$PY" -c "import bitsandbytes" >/dev/null 2>&1 && echo 1 || echo 0)
n_gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
has_bf16=$("$PY" -c "import torch; print(torch.cuda.is_bf16_supported())")
"$PY" "$WORK/check.py" build_model "$WORK/llama" || { echo "-- building the small llama: FAILED"; exit 1; }

step "2. LoRA in bf16 (train, then base vs fine-tuned at the end)"
if [ "$has_bf16" = True ]; then dtype=bfloat16; else dtype=auto; echo "(this GPU has no bf16: float16 instead)"; fi
"$PY" "$WORK/check.py" run "$WORK/llama" "$WORK/bf16" model.dtype=$dtype
result "LoRA bf16" $?

step "3. QLoRA: 4-bit NF4, double quantization, bf16 compute, gradient checkpointing, paged 8-bit AdamW"
if [ "$has_bnb" = 1 ]; then
  "$PY" "$WORK/check.py" run "$WORK/llama" "$WORK/qlora" model.load_in_4bit=true train.gradient_checkpointing=true \
    train.optimizer=auto
  result "QLoRA" $?
else
  echo "-- QLoRA: SKIPPED (bitsandbytes does not import)"
fi

step "4. mathtune eval (base vs fine-tuned) of the bf16 run"
if [ -d "$WORK/bf16/adapter" ]; then
  "$PY" -m mathtune eval "$WORK/bf16" --base --limit 16 --max-new-tokens 48
  result "eval" $?
else
  echo "-- eval: SKIPPED (no bf16 run)"
fi

step "5. mathtune export of the bf16 run"
if ! "$PY" -m mathtune export --help >/dev/null 2>&1; then
  echo "-- export: SKIPPED (this mathtune has no export command)"
elif [ -d "$WORK/bf16/adapter" ]; then
  "$PY" -m mathtune export "$WORK/bf16" --to hf
  result "export --to hf" $?
else
  echo "-- export: SKIPPED (no bf16 run)"
fi

step "6. DDP on 2 GPUs (torchrun)"
if [ "$n_gpus" -ge 2 ]; then
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m mathtune train --model "$WORK/llama" \
    --output "$WORK/ddp" --set model.device=cuda --set data.max_seq_length=256 --set train.max_steps=40 \
    --set train.batch_size=4 --set train.save_steps=20 --set eval.at_end=false \
    && "$PY" "$WORK/check.py" ddp_summary "$WORK/ddp"
  result "DDP on 2 GPUs" $?
else
  echo "-- DDP: SKIPPED ($n_gpus GPU)"
fi

step "7. tests marked gpu"
if "$PY" -c "import pytest" >/dev/null 2>&1; then
  "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
  status=$?
  [ $status -eq 5 ] && status=0  # 5: no test collected
  result "pytest -m gpu" $status
else
  echo "-- pytest -m gpu: SKIPPED (pytest not installed)"
fi

printf '\n== done in %d s: %s\n' $((SECONDS - started)) "$([ $failed -eq 0 ] && echo 'every step that ran passed' || echo 'SOME STEPS FAILED')"
exit $failed
