"""Merged safetensors: the base model with the adapter folded in, as a plain Transformers folder.

    mathtune export runs/x --to hf

`AutoModelForCausalLM.from_pretrained(folder)` loads it (and so do vLLM, TGI, llama.cpp's
convert_hf_to_gguf.py...). PEFT does the merge, so every adapter PEFT trains (DoRA, rsLoRA, rank
patterns) is merged the way it was trained. The base is loaded once in its own dtype and merged in
place, so the RAM it needs is printed first and a base that cannot fit is refused before loading.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from mathtune import hardware
from mathtune.doctor.memory import read_model_shape
from mathtune.errors import MathtuneError, ModelError
from mathtune.export.gguf import HEADER_ALLOWANCE
from mathtune.files import is_disk_full, no_space, publish, require_space
from mathtune.hardware import resolve_device, resolve_dtype
from mathtune.model.load import resolve_source
from mathtune.run import load_trained

log = logging.getLogger(__name__)
GIB = 1 << 30


def merged_folder(run_dir: Path, cfg, out: Path) -> list[str]:
    # A QLoRA run's adapter is merged into the full-precision base, never into its NF4 approximation.
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"load_in_4bit": False})})
    check_memory(cfg)
    model, tokenizer = load_trained(run_dir, cfg)
    merged = model.merge_and_unload()
    merged.config.use_cache = True
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    needed = sum(p.numel() * p.element_size() for p in merged.parameters()) + HEADER_ALLOWANCE
    require_space(out, needed)
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        publish(tmp, out)  # an older export of the same name stays whole until this one is
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise MathtuneError(no_space(out, needed, during=True)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dtype = str(next(merged.parameters()).dtype).removeprefix("torch.")
    return [f"{sum(p.numel() for p in merged.parameters()):,} parameters in {dtype}, tokenizer and chat template"]


def check_memory(cfg, memory=None) -> None:
    """Say how much RAM the merge needs, and refuse before loading anything when it is not there: the
    whole base is loaded in its dtype and merged in place (a 7B model in float32 is ~28 GiB).
    On a GPU the base goes to GPU memory; this checks the CPU case."""

    source = resolve_source(cfg.model)
    device = resolve_device(cfg.model.device)
    if source.kind == "hub" or device == "cuda":
        return
    shape = read_model_shape(Path(source.path))
    dtype = resolve_dtype(cfg.model.dtype, device)
    need = shape.params * dtype.itemsize * 1.1 + 0.5e9  # the weights, the adapter, the process
    available = (memory or hardware.probe_memory)().get("available")
    log.info("--to hf loads the base whole: %.2fB parameters in %s, about %.1f GiB of RAM", shape.params / 1e9,
             str(dtype).removeprefix("torch."), need / GIB)
    if available is not None and need > available:
        raise ModelError(f"{source.path}: `--to hf` loads the whole base model ({shape.params / 1e9:.2f}B parameters in "
                         f"{str(dtype).removeprefix('torch.')}): about {need / GIB:.1f} GiB of RAM, and {available / GIB:.1f} "
                         "GiB are available. `--to gguf` merges tensor by tensor in under 2 GB at any size; or run "
                         "this on a machine with more memory.")
