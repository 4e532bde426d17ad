"""`mathtune export`: a trained run back to where the user runs models.

    mathtune export runs/x --to gguf [--quant f16|bf16|q8_0] [--requant-all]   # LM Studio, llama.cpp
    mathtune export runs/x --to lmstudio [--quant ...]   # the same file, into LM Studio's models folder
    mathtune export runs/x --to ollama [--quant ...]     # the same file and a Modelfile: ollama create
    mathtune export runs/x --to gguf-lora                                      # llama-cli --lora
    mathtune export runs/x --to hf                                             # merged safetensors
    mathtune export runs/x --to gguf --check   # then score the file through llama.cpp (mathtune eval --gguf)

Outputs go to RUN_DIR/export/ (or --output; --to lmstudio: <LM Studio's models folder>/mathtune/<run
name>/), are written aside and renamed when complete, and are never overwritten without --overwrite.
One process at a time writes an output (mathtune/locks.py); a disk without room for the output is
found before writing, or when it fills up, and leaves nothing.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from mathtune.errors import MathtuneError, ModelError
from mathtune.eval.gguf import evaluate_gguf
from mathtune.export.adapter import read_adapter
from mathtune.export.gguf import QUANTS, lora_gguf, mergeable_arch, merged_from_gguf, tensor_names_for
from mathtune.export.gguf_hf import gguf_arch, heads, lora_names, merged_from_folder, read_config
from mathtune.export.hf import merged_folder
from mathtune.export.ollama import MODELFILE, base_generation_config, model_name, modelfile, write_folder
from mathtune.locks import lock_output, released_at_exit
from mathtune.model.gguf import gguf_field, gguf_heads
from mathtune.model.lmstudio import ENV_DIR, export_folder
from mathtune.model.load import resolve_source
from mathtune.run import ADAPTER, EXPORT, load_run_config

TARGETS = ("gguf", "lmstudio", "ollama", "gguf-lora", "hf")
MERGED_GGUF = ("gguf", "lmstudio", "ollama")
"""The targets that write the merged GGUF (--to ollama: into a folder, beside its Modelfile)."""
FOLDERS = ("ollama", "hf")


@dataclass
class ExportResult:
    path: Path
    target: str
    size: int
    seconds: float
    base: str
    """The base model the run trained on (a .gguf file, a folder or a hub id)."""
    notes: list[str] = field(default_factory=list)
    model_name: str | None = None
    """--to ollama: the name the printed `ollama create` gives the model."""


def export_run(run_dir: Path, to: str, quant: str = "f16", requant_all: bool = False, output: Path | None = None,
               overwrite: bool = False) -> ExportResult:

    if to not in TARGETS:
        raise MathtuneError(f"--to {to}: expected one of {', '.join(TARGETS)}")
    if quant not in QUANTS:
        raise MathtuneError(f"--quant {quant}: expected one of {', '.join(QUANTS)}")
    if to == "lmstudio" and output is not None:
        raise MathtuneError(f"--output: --to lmstudio writes into LM Studio's models folder (set {ENV_DIR} to "
                            "choose another); use --to gguf --output PATH for a file elsewhere")
    cfg = load_run_config(run_dir)
    source = resolve_source(cfg.model)
    name = base_name(source)
    folder = export_folder(run_dir.resolve().name) if to == "lmstudio" else run_dir / EXPORT
    out = output or folder / {"gguf": f"{name}-{quant}.gguf", "lmstudio": f"{name}-{quant}.gguf",
                              "ollama": f"{name}-ollama", "gguf-lora": f"{name}-lora.gguf", "hf": f"{name}-merged"}[to]
    out.parent.mkdir(parents=True, exist_ok=True)
    with released_at_exit():
        lock_output(out)  # a second export into the same output (another window, a double-click) stops here
        if out.exists():
            if not overwrite:
                elsewhere = "" if to == "lmstudio" else ", or --output elsewhere"
                raise MathtuneError(f"{out}: already exists; pass --overwrite to replace it{elsewhere}")
            if out.is_dir() != (to in FOLDERS):
                kind = "a folder" if out.is_dir() else "a file"
                raise MathtuneError(f"{out}: is {kind}; --to {to} writes a {'folder' if to in FOLDERS else 'file'} "
                                    "there. Choose another --output.")
        started = time.perf_counter()
        notes = _write(run_dir, to, cfg, source, name, out, quant, requant_all)
    size = sum(p.stat().st_size for p in out.rglob("*")) if out.is_dir() else out.stat().st_size
    return ExportResult(out, to, size, time.perf_counter() - started, source.path, notes,
                        model_name(run_dir, name) if to == "ollama" else None)


def _write(run_dir: Path, to: str, cfg, source, name: str, out: Path, quant: str, requant_all: bool) -> list[str]:
    if to == "hf":
        return merged_folder(run_dir, cfg, out)
    _check_architecture(source, to)  # before the adapter: the architecture is the first thing to know
    adapter = read_adapter(run_dir / ADAPTER)
    if to not in MERGED_GGUF:
        return _lora_gguf(source, adapter, out, name)
    from transformers import AutoTokenizer

    # The tokenizer saved with the adapter carries the chat template the run trained with.
    tokenizer = AutoTokenizer.from_pretrained(run_dir / ADAPTER)
    if to != "ollama":
        return _merged_gguf(source, adapter, tokenizer, out, quant, requant_all)
    gguf_name = f"{name}-{quant}.gguf"
    # The Modelfile first: a system prompt it cannot carry is refused before the long write.
    text, notes = modelfile(gguf_name, model_name(run_dir, name), tokenizer, cfg.data.system_prompt,
                            base_generation_config(None if source.kind == "gguf" else _base_folder(source)))
    written = write_folder(out, gguf_name, text,
                           lambda path: _merged_gguf(source, adapter, tokenizer, path, quant, requant_all))
    return written + notes


def _check_architecture(source, to: str) -> None:
    if source.kind == "gguf":
        if to in MERGED_GGUF:
            import gguf

            mergeable_arch(gguf.GGUFReader(source.path), Path(source.path))
        return

    folder = _base_folder(source)
    gguf_arch(read_config(folder), folder)


def _merged_gguf(source, adapter, tokenizer, out: Path, quant: str, requant_all: bool) -> list[str]:
    if source.kind == "gguf":
        return merged_from_gguf(Path(source.path), adapter, out, quant, requant_all, tokenizer.chat_template)

    return merged_from_folder(_base_folder(source), tokenizer, adapter, out, quant)


def _lora_gguf(source, adapter, out: Path, name: str) -> list[str]:
    if source.kind == "gguf":
        import gguf

        reader = gguf.GGUFReader(source.path)
        arch, n_head, n_head_kv = gguf_heads(reader)
        names = tensor_names_for(adapter, arch, int(gguf_field(reader, f"{arch}.block_count")),
                                 {t.name for t in reader.tensors})
    else:
        folder = _base_folder(source)
        arch, names = lora_names(folder, adapter)
        n_head, n_head_kv = heads(read_config(folder))
    return lora_gguf(adapter, arch, names, n_head, n_head_kv, out, name)


def _base_folder(source) -> Path:
    if source.kind == "folder":
        return Path(source.path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.path, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any miss means the same thing to the user
        raise ModelError(f"{source.path}: not in the local hub cache ({exc.__class__.__name__}); download it and set "
                         "model.path to its folder") from None


def merged_gguf_path(run_dir: Path, quant: str = "f16") -> Path:
    """Where `mathtune export RUN --to gguf --quant QUANT` writes by default: RUN_DIR/export/<model>-QUANT.gguf."""
    return run_dir / EXPORT / f"{base_name(resolve_source(load_run_config(run_dir).model))}-{quant}.gguf"


def written_gguf(result: ExportResult) -> Path:
    """The GGUF file an export wrote (--to ollama: the one in its folder, beside the Modelfile)."""
    if result.target == "hf":
        raise MathtuneError("--check scores a GGUF file through llama.cpp; --to hf writes safetensors")
    if result.target == "ollama":
        return next(p for p in sorted(result.path.iterdir()) if p.suffix == ".gguf")
    return result.path


def check_export(run_dir: Path, result: ExportResult) -> dict:
    """`mathtune export ... --check`: the written file scored through llama.cpp against the PyTorch
    model on the run's held-out problems (mathtune.eval.gguf)."""
    return evaluate_gguf(run_dir, written_gguf(result))


def base_name(source) -> str:
    """'SmolLM2-135M-Instruct.Q4_1.gguf' -> 'SmolLM2-135M-Instruct'; a folder's or hub id's last part."""
    stem = Path(source.path).stem if source.kind == "gguf" else Path(source.path.rstrip("/")).name
    return re.sub(r"[.\-_](?:i?q\d\w*|f16|f32|bf16)$", "", stem, flags=re.IGNORECASE) or stem


def how_to_use(result: ExportResult) -> list[str]:
    """The closing lines of `mathtune export`: where the output is and how to load it."""
    size = f"{result.size / 1e6:,.1f} MB"
    lines = [f"Written {result.path} ({size}) in {result.seconds:.1f} s", *(f"  - {n}" for n in result.notes)]
    p = result.path
    if result.target == "gguf":
        lines += [
            "LM Studio: --to lmstudio writes it there for you; it lists models as <publisher>/<model>/<file>.gguf "
            "under its models folder",
            f"  (~/.lmstudio/models by default), e.g.: mkdir -p ~/.lmstudio/models/mathtune/{p.stem} && "
            f"cp {p} ~/.lmstudio/models/mathtune/{p.stem}/",
            f"  or: lms import {p}",
            f"llama.cpp: llama-cli -m {p} -cnv",
        ]
    elif result.target == "lmstudio":
        lines += [f"LM Studio lists it in My Models as mathtune/{p.parent.name}/{p.name} (reopen the list, or "
                  "restart LM Studio, if it was open)",
                  f"llama.cpp: llama-cli -m {p} -cnv"]
    elif result.target == "ollama":
        lines += [f"Ollama: ollama create {result.model_name} -f {_arg(p / MODELFILE)}",
                  f"  then: ollama run {result.model_name}   (the folder can be moved: the Modelfile names the GGUF "
                  "beside it)"]
    elif result.target == "gguf-lora":
        lines += [
            f"llama.cpp: llama-cli -m {result.base} --lora {p} -cnv",
            "  (the base must be the model this run trained on; LM Studio loads merged models: use --to gguf)",
        ]
    else:
        lines += [f"Transformers: AutoModelForCausalLM.from_pretrained('{p}'); vLLM: vllm serve {p}"]
    return lines


def _arg(path: Path) -> str:
    """A path to paste into a command: quoted when it has a space (bash, PowerShell and cmd agree on double quotes)."""
    return f'"{path}"' if " " in str(path) else str(path)
