"""Merged safetensors: the base model with the adapter folded in, as a plain Transformers folder.

    mathtune export runs/x --to hf

`AutoModelForCausalLM.from_pretrained(folder)` loads it (and so do vLLM, TGI, llama.cpp's
convert_hf_to_gguf.py...). PEFT does the merge, so every adapter PEFT trains (DoRA, rsLoRA, rank
patterns) is merged the way it was trained. The base is loaded once in its own dtype and merged in
place.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mathtune.checkpoints import publish
from mathtune.errors import MathtuneError
from mathtune.export.gguf import HEADER_ALLOWANCE
from mathtune.files import is_disk_full, no_space, require_space


def merged_folder(run_dir: Path, cfg, out: Path) -> list[str]:
    from mathtune.model import load_trained

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
