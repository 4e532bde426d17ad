"""Can this machine train, and what is wrong with its PyTorch/CUDA install? `mathtune doctor`.

    mathtune doctor                                   # report and diagnosis; exit 0 if the device is usable
    mathtune doctor --device cuda --json              # for scripts
    mathtune doctor --model ~/models/mathstral-7B-v0.1-Q4_K_M.gguf --config configs/mathstral-7b-qlora.yaml

Every fact comes from a probe function in `Probes` (nvidia-smi, torch, bitsandbytes, /proc/meminfo,
disk, library versions), so tests replace them to play a GPU machine, a CPU-only wheel beside an
NVIDIA driver, an old driver... `diagnose` (diagnosis.py) turns the facts into findings, each with the exact command
that fixes it. Exit status: 0 when the requested device (--device, else the config's model.device,
else auto) is usable, and the planned run fits on it when --model is given; 1 otherwise. For `auto`
an NVIDIA GPU that PyTorch cannot use counts as a failure: auto means "the best device here".
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mathtune import hardware  # through the module: tests stand in for the CPU at mathtune.hardware.cpu_bf16_units
from mathtune.config import load_config, resolve_optimizer
from mathtune.doctor.diagnosis import diagnose
from mathtune.doctor.memory import ModelShape, Plan, estimate_memory, fit_plan, read_model_shape
from mathtune.errors import ModelError
from mathtune.files import cache_root
from mathtune.hardware import PROBES, Probes, auto_dtype
from mathtune.model.cache import cache_folder
from mathtune.model.convert import damage, plan_conversion
from mathtune.model.gguf import GGUF_MAGIC, check_gguf_architecture, read_magic
from mathtune.model.load import resolve_source

GIB = 1 << 30  # sizes are shown in GiB: a "12 GB" card has 12 GiB


# What a probe is taken to have found when it fails outright (each probe already turns the usual
# breakages into facts; this is for the ones nobody foresaw).
UNREAD = {"system": {"os": "unknown", "python": "unknown", "python_executable": None, "cpu_threads": None},
          "torch": {"installed": False}, "bitsandbytes": {"installed": False}, "versions": {},
          "memory": {"total": None, "available": None}}


def gather(probes: Probes, output_dir: Path) -> dict[str, Any]:
    """Every fact the doctor reports, as plain JSON-able values. A probe that raises is reported in
    `unreadable` and the others go on."""
    unreadable: dict[str, str] = {}
    facts = {name: _read(unreadable, name, getattr(probes, name)) for name in
             ("system", "torch", "nvidia_smi", "bitsandbytes", "versions", "memory")}
    facts["disk"] = {"path": str(output_dir), "free": _read(unreadable, "disk", probes.disk_free, output_dir)}
    facts["unreadable"] = unreadable
    return facts


def _read(unreadable: dict[str, str], name: str, probe: Callable[..., Any], *args: Any) -> Any:
    try:
        return probe(*args)
    except Exception as exc:  # noqa: BLE001 - the doctor must answer on a broken machine
        unreadable[name] = f"{type(exc).__name__}: {exc}"
        if name in ("torch", "nvidia_smi", "bitsandbytes"):
            return {**UNREAD.get(name, {"gpus": []}), "error": f"the probe failed ({unreadable[name]})"}
        return UNREAD.get(name) and dict(UNREAD[name])


def unused_gpu_warning(requested: str, resolved: str, probes: Probes = PROBES) -> str | None:
    """Before training: when model.device auto came out as the CPU although nvidia-smi lists a GPU
    (a CPU-only PyTorch wheel, a driver too old for the CUDA build...), the doctor's finding and its
    fix, in one text; None otherwise. Costs one nvidia-smi call, and nothing where it is absent."""
    if requested != "auto" or resolved != "cpu":
        return None
    unreadable: dict[str, str] = {}
    smi = _read(unreadable, "nvidia_smi", probes.nvidia_smi)
    if not (smi and smi.get("gpus")):
        return None
    facts = {"system": _read(unreadable, "system", probes.system), "torch": _read(unreadable, "torch", probes.torch),
             "nvidia_smi": smi, "bitsandbytes": {"installed": False}}
    findings, _, usable = diagnose(facts, "auto")
    finding = next((f for f in findings if f.level == "error"), None)
    if usable or finding is None:
        return None
    fix = f"\n  fix: {finding.fix}" if finding.fix else ""
    return (f"model.device auto trains on the CPU here: {finding.message}.{fix}\n  (model.device: cpu trains on "
            "the CPU on purpose, without this warning)")


def plan_from_config(cfg, device: str, cpu_bf16: str | None = None) -> Plan:
    """The memory-relevant settings of a config, with 'auto' dtype resolved for `device` (on a CPU
    with `cpu_bf16` units, as probe_torch reads them, auto is bfloat16)."""
    dtype = cfg.model.dtype if cfg.model.dtype != "auto" else auto_dtype(device, cpu_bf16)
    return Plan(device=device, dtype_bytes=4 if dtype == "float32" else 2, load_in_4bit=cfg.model.load_in_4bit,
                lora_r=cfg.lora.r, lora_targets=cfg.lora.target_modules, batch_size=cfg.train.batch_size,
                seq_len=cfg.data.max_seq_length, gradient_checkpointing=cfg.train.gradient_checkpointing,
                optimizer=resolve_optimizer(cfg, device))


def capacity(facts: dict[str, Any], device: str) -> tuple[float | None, str]:
    """Bytes available to a run on `device`, and what they are."""
    if device == "cuda":
        gpus = facts["torch"].get("gpus") or (facts["nvidia_smi"] or {}).get("gpus") or []
        gpus = [g for g in gpus if g.get("memory_total")]  # nvidia-smi may not report it ("[N/A]")
        if not gpus:
            return None, "no GPU with a known memory size"
        g = max(gpus, key=lambda g: g.get("memory_free") or g["memory_total"])
        free = g.get("memory_free") or g["memory_total"]
        return float(free), f"{g['name']}: {free / GIB:.1f} GiB free of {g['memory_total'] / GIB:.1f} GiB"
    available = facts["memory"].get("available")
    if available is None or not facts["memory"].get("total"):
        return None, "RAM unknown"
    return float(available), f"RAM: {available / GIB:.1f} GiB available of {facts['memory']['total'] / GIB:.1f} GiB"


def estimate_run(shape: ModelShape, plan: Plan, room: float | None) -> dict[str, Any]:
    estimate = estimate_memory(shape, plan)
    result: dict[str, Any] = {"plan": plan.__dict__, "bytes": estimate, "capacity": room,
                              "fits": room is not None and estimate["total"] <= room}
    if room is not None and not result["fits"]:
        found = fit_plan(shape, plan, room)
        result["fix"] = {"set": plan.overrides(found[0]), "total": found[1]["total"]} if found else None
    return result


def model_estimate(cfg, model: str, facts: dict[str, Any], device: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's shape and the memory estimate of the run `cfg` plans with it on `device` (also `mathtune ui`'s)."""
    shape = read_model_shape(Path(model))
    room, where = capacity(facts, device)
    plan = plan_from_config(cfg, device, facts["torch"].get("cpu_bf16"))
    return {"path": model, **shape.__dict__}, {**estimate_run(shape, plan, room), "where": where}


def run_doctor(model: str | None = None, config: Path | None = None, device: str | None = None,
               as_json: bool = False, probes: Probes = PROBES, out: Callable[[str], None] = print) -> int:
    """`mathtune doctor`: gather, diagnose, estimate, print; returns the exit status."""

    cfg = load_config(config, {"model.path": model} if model else None, check_machine=False)
    facts = gather(probes, Path(cfg.output.dir or "runs"))
    requested = device or cfg.model.device
    findings, resolved, usable = diagnose(facts, requested, need_4bit=cfg.model.load_in_4bit)
    report: dict[str, Any] = {**facts, "findings": [f.__dict__ for f in findings],
                              "device": {"requested": requested, "resolved": resolved, "usable": usable}}
    if model:
        model_path = Path(model).expanduser()
        if not model_path.exists():  # a piece of an LM Studio model's name (--model mathstral), or a mistake

            model_path = Path(resolve_source(cfg.model).path)
        report["model"], report["estimate"] = model_estimate(cfg, str(model_path), facts, resolved)
        if not report["estimate"]["fits"]:
            usable = False
        report["conversion"] = conversion_needs(model_path, cfg.model.cache_dir, facts)
        if report["conversion"] and not report["conversion"]["fits"]:
            usable = False
    report["ok"] = usable
    out(json.dumps(report, indent=2, default=str) if as_json else format_report(report))
    return 0 if usable else 1


def conversion_needs(path: Path, cache_dir: Path | None, facts: dict[str, Any]) -> dict[str, Any] | None:
    """For a GGUF file: the RAM and disk its one-time conversion takes, and whether they are here
    (nothing to convert when the cache already holds it). None for a Transformers folder."""
    import shutil


    if not path.is_file():
        return None
    if read_magic(path) != GGUF_MAGIC:
        return None
    plan = plan_conversion(path)
    folder = cache_folder(path, cache_root(cache_dir))
    cached = (folder / "config.json").is_file() and damage(folder) is None
    root = next((p for p in (folder, *folder.parents) if p.exists()), Path.cwd())
    free = shutil.disk_usage(root).free
    ram = facts["memory"].get("available")
    return {"folder": str(folder), "cached": cached, "dtype": plan.dtype, "streaming": plan.streaming,
            "ram": plan.ram_bytes, "disk": plan.disk_bytes, "disk_free": free, "ram_available": ram,
            "fits": cached or (free >= plan.disk_bytes and (ram is None or ram >= plan.ram_bytes))}


def format_conversion(c: dict[str, Any]) -> list[str]:
    if c["cached"]:
        return [f"conversion    done: {c['folder']}"]
    ram = "" if c["ram_available"] is None else f" ({c['ram_available'] / GIB:.1f} GiB available)"
    lines = [f"conversion    once, into {c['folder']}: {c['dtype']}, "
             f"{'tensor by tensor' if c['streaming'] else 'whole model in memory'}; needs "
             f"{c['ram'] / GIB:.1f} GiB of RAM{ram} and {c['disk'] / GIB:.1f} GiB of disk ({c['disk_free'] / GIB:.1f} "
             f"GiB free): " + ("fits" if c["fits"] else "does NOT fit")]
    if not c["fits"]:
        lines.append("              convert elsewhere with `mathtune convert FILE.gguf --output DIR` and set model.path "
                     "to DIR, or set MATHTUNE_CACHE to a disk with room")
    return lines


def preflight(cfg, source, device: str, probes: Probes | None = None) -> None:
    """Refuse a run that cannot fit this machine before anything is converted or written: the doctor's
    memory estimate of the run, and the RAM and disk of a GGUF file's conversion. Skipped for a hub id
    (no local shape) and under a multi-process launch (the estimate is for one process)."""
    import os


    if source.kind == "hub" or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    probes = probes or PROBES
    if source.kind == "gguf":
        check_gguf_architecture(Path(source.path))  # a file transformers cannot load says so first
    if cfg.model.load_in_4bit:
        bnb = probes.bitsandbytes()  # installed (the config checked that), but can it quantize here?
        if bnb.get("installed") and not bnb.get("usable"):
            raise ModelError(f"model.load_in_4bit: bitsandbytes {bnb.get('version')} cannot run here "
                             f"({bnb.get('error')}): pip install --upgrade bitsandbytes, or set model.load_in_4bit: false")
    # The torch facts a run needs: a GPU's free memory, or whether the CPU's bf16 units halve the
    # weights (read alone: the whole torch probe would start CUDA on a GPU machine told to use its CPU).
    torch_facts = probes.torch() if device == "cuda" else {"cpu_bf16": hardware.cpu_bf16_units()} if device == "cpu" else {}
    facts = {"torch": torch_facts, "nvidia_smi": None, "memory": probes.memory()}
    model, estimate = model_estimate(cfg, source.path, facts, device)
    check = f"mathtune doctor --model {source.path}"
    if estimate["capacity"] is not None and not estimate["fits"]:
        fix = estimate.get("fix")
        hint = (f"It fits with: {' '.join('--set ' + s for s in fix['set'])} (about {fix['total'] / GIB:.1f} GiB)"
                if fix else "No setting makes it fit here: use a larger GPU or a smaller model")
        raise ModelError(f"{source.path} ({model['params'] / 1e9:.2f}B parameters): this run needs about "
                         f"{estimate['bytes']['total'] / GIB:.1f} GiB and {estimate['where']}. {hint}. Details: {check}")
    conversion = conversion_needs(Path(source.path), cfg.model.cache_dir, facts) if source.kind == "gguf" else None
    if conversion and not conversion["fits"]:
        raise ModelError("\n".join([f"{source.path}: its conversion does not fit this machine", *format_conversion(conversion)]))


# ---------------------------------------------------------------------------------------------
# Text output


def format_report(r: dict[str, Any]) -> str:
    s, t, smi, bnb, mem = r["system"], r["torch"], r["nvidia_smi"], r["bitsandbytes"], r["memory"]
    lines = [f"system        {s.get('os')}, Python {s.get('python')}, {s.get('cpu_threads') or '?'} CPU threads"
             + (f" (torch uses {t['threads']})" if t.get("threads") else "")]
    ram = (f"{mem['total'] / GIB:.1f} GiB total, {_gib(mem.get('available'))} GiB available" if mem.get("total")
           else "unknown")
    disk = f"{r['disk']['free'] / GIB:.1f} GiB free at {r['disk']['path']}" if r["disk"]["free"] is not None else "unknown"
    lines += [f"memory        RAM {ram}; disk {disk}"]
    lines += [*_torch_lines(t), *_nvidia_smi_lines(smi)]
    for name, error in r.get("unreadable", {}).items():
        lines.append(f"unreadable    the {name} probe failed: {error}")
    lines.append("bitsandbytes  " + (("works" if bnb.get("usable") else f"installed, not usable ({bnb.get('error')})")
                                     + f" ({bnb.get('version')})" if bnb.get("installed") else "not installed"))
    lines.append("libraries     " + ", ".join(f"{k} {v or '-'}" for k, v in r["versions"].items()))
    lines += ["", "diagnosis"]
    for f in r["findings"]:
        lines.append(f"  [{f['level']}] {f['message']}")
        if f["fix"]:
            lines.append(f"     fix: {f['fix']}")
    if "estimate" in r:
        lines += ["", *format_estimate(r["model"], r["estimate"])]
    if r.get("conversion"):
        lines += format_conversion(r["conversion"])
    d = r["device"]
    lines += ["", f"device {d['requested']}" + (f" -> {d['resolved']}" if d["resolved"] != d["requested"] else "")
              + (": usable" if d["usable"] else ": NOT usable") + ("" if r["ok"] or not d["usable"] else
                                                                  ", but the planned run does not fit")]
    return "\n".join(lines)


def _torch_lines(t: dict[str, Any]) -> list[str]:
    """The report's PyTorch section: its build, each GPU it sees, MPS and the CPU kernels."""
    if not t.get("installed"):
        return [f"pytorch       not importable: {t.get('error')}"]
    build = (f"CUDA {t['cuda_build']}" if t.get("cuda_build") else f"ROCm {t['hip_build']}" if t.get("hip_build")
             else "CPU-only")
    lines = [f"pytorch       {t['version']} ({build} build), CUDA available: {'yes' if t.get('cuda_available') else 'no'}"
             + ("" if t.get("cuda_available") or not t.get("cuda_error") else f" ({t['cuda_error']})")]
    for i, g in enumerate(t.get("gpus") or []):
        free = f", {g['memory_free'] / GIB:.1f} GiB free" if g.get("memory_free") else ""
        lines.append(f"gpu {i}         {g['name']}: {g['memory_total'] / GIB:.1f} GiB{free}, compute capability "
                     f"{g['capability']}, bf16 {'yes' if g.get('bf16') else 'no'}")
    lines.append(f"mps           {'available' if t.get('mps') else 'not available'}")
    if t.get("cpu_kernels"):
        lines.append(f"cpu           {t['cpu_kernels']} kernels, bf16 units: {t.get('cpu_bf16') or 'none'}")
    return lines


def _nvidia_smi_lines(smi: dict[str, Any] | None) -> list[str]:
    """The report's nvidia-smi section: the driver and its GPUs, or why they are unknown."""
    if smi is None:
        lines = ["nvidia-smi    not found"]
    elif smi.get("error"):
        lines = [f"nvidia-smi    fails: {smi['error']}"]
    else:
        gpus = "; ".join(f"{g['name']} {_gib(g.get('memory_total'))} GiB" for g in smi["gpus"])
        lines = [f"nvidia-smi    driver {smi.get('driver') or '?'} (CUDA up to {smi.get('cuda') or '?'}): {gpus}"]
    return lines + [f"nvidia-smi    unreadable line: {line}" for line in (smi or {}).get("unreadable", [])]


def _gib(value: float | None) -> str:
    return f"{value / GIB:.1f}" if value else "?"


def format_estimate(m: dict[str, Any], e: dict[str, Any]) -> list[str]:
    p, b = e["plan"], e["bytes"]
    precision = "4-bit NF4" if p["load_in_4bit"] else {2: "16-bit", 4: "float32"}[p["dtype_bytes"]]
    lines = [f"memory estimate for {m['path']} ({m['params'] / 1e9:.2f}B parameters, {m['layers']} layers, "
             f"hidden {m['hidden']}, from the {m['source']})",
             f"  plan: {p['device']}, {precision} weights, LoRA r={p['lora_r']}, batch {p['batch_size']} x "
             f"{p['seq_len']} tokens, gradient checkpointing {'on' if p['gradient_checkpointing'] else 'off'}, "
             f"{p['optimizer']}"]
    for part in ("weights", "lora", "activations", "logits", "overhead"):
        extra = f" ({b['lora_params'] / 1e6:.1f}M trainable parameters, their gradients and optimizer state)" \
            if part == "lora" else ""
        lines.append(f"  {part:<12}{b[part] / GIB:7.2f} GiB{extra}")
    lines.append(f"  {'total':<12}{b['total'] / GIB:7.2f} GiB  vs {e['where']}: "
                 + ("fits" if e["fits"] else "does NOT fit"))
    if not e["fits"] and e.get("fix"):
        lines.append(f"  fits with: {' '.join('--set ' + s for s in e['fix']['set'])} "
                     f"(about {e['fix']['total'] / GIB:.1f} GiB)")
    elif not e["fits"] and e["capacity"] is not None:
        lines.append("  no setting makes it fit here: use a larger GPU or a smaller model")
    return lines
