"""Device and dtype choice, and the probes `mathtune doctor` reads the machine with.

CUDA, then Apple MPS, then CPU. On a CPU, `model.dtype: auto` trains in bfloat16 where the cores have
bf16 matrix units (AMX, AVX512-BF16) and in float32 elsewhere, where bf16 products are emulated and
measured far slower than float32 (see `cpu_bf16_units`).
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mathtune.files import free_bytes

if TYPE_CHECKING:
    import torch


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def bitsandbytes_available() -> bool:
    """Installed, without importing it (the import itself probes CUDA and can take seconds)."""
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def resolve_device(requested: str) -> str:
    """'auto' -> the best device present; an explicit choice is kept (the config checked it)."""
    if requested != "auto":
        return requested
    if cuda_available():
        return "cuda"
    if mps_available():
        return "mps"
    return "cpu"


BF16_EMULATED = ("bf16 products are emulated there: a LoRA step of SmolLM2-135M ran 24x slower in bf16 than in "
                 "float32 (AMD EPYC with AVX2 only, torch 2.13)")


def cpu_bf16_units() -> str | None:
    """The CPU's native bf16 matrix instructions, as PyTorch's own dispatch detects them: "AMX" (Intel
    Xeon since Sapphire Rapids), "AVX512-BF16" (Intel Cooper Lake, AMD Zen 4 and later), or None.

    Without them PyTorch emulates bf16 products (BF16_EMULATED). With AMX, a 4096 x 576 @ 576 x 576
    product ran at 2,529 GFLOP/s in bf16 against 313 in float32 (Xeon Sapphire Rapids, 2 threads)."""
    import torch

    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    return None


def resolve_dtype(requested: str, device: str) -> torch.dtype:
    """The dtype the base model's weights are loaded in; `train.training_arguments` turns on bf16
    autocast for a bfloat16 model on CUDA and CPU alike (LoRA weights and optimizer state stay float32).

    A bfloat16 CPU run stores the frozen weights in bf16 rather than keeping them float32 under
    autocast: autocast caches the casts of trainable weights only, so float32 frozen weights are
    cast again in every forward (measured: 3 casts per forward of a frozen linear layer, against 1
    for a trainable one), and they take twice the memory. On SmolLM2-135M a step with float32
    weights under autocast took 9% longer than with bf16 weights, at the same loss to 0.2% after 3
    steps (both emulated, on a CPU without bf16 units: a ratio, not a speed). It is also the CUDA
    recipe: one precision path for both."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    cuda_bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    return getattr(torch, auto_dtype(device, cpu_bf16_units() if device == "cpu" else None, cuda_bf16))


def reload_dtype(trained: str, device: str) -> tuple[str, str | None]:
    """The dtype to reload a run's base in on this machine, from the dtype it trained in, and why it
    differs where it does. The trained dtype, unless this device would emulate it: a CPU without bf16
    units (or any CPU, for float16) reloads in float32, which holds the bf16 weights exactly but
    rounds the products less, so answers may differ a little from the run's own evaluation."""
    device = resolve_device(device)
    if device == "cuda" or trained == "float32":
        return trained, None
    if device == "cpu" and trained == "bfloat16" and cpu_bf16_units():
        return trained, None
    where = "this CPU has no bf16 units" if device == "cpu" and trained == "bfloat16" else f"{trained} on {device} is emulated"
    return "float32", (f"trained in {trained}; {where}, so the base is loaded in float32 (the same weights; answers may "
                       "differ slightly from the run's own evaluation). --set model.dtype=... chooses another")


def auto_dtype(device: str, cpu_bf16: str | None, cuda_bf16: bool = True) -> str:
    """`model.dtype: auto` on `device`, from what is known of it (this machine's probes, or the
    doctor's facts of the machine it plans for): bfloat16 on a GPU that has it (else float16) and
    on a CPU with `cpu_bf16` units, float32 elsewhere. MPS autocast in half precision is not
    reliable for training yet; a CPU without bf16 units emulates bf16 products."""
    if device == "cuda":
        return "bfloat16" if cuda_bf16 else "float16"
    return "bfloat16" if device == "cpu" and cpu_bf16 else "float32"


# ---------------------------------------------------------------------------------------------
# Probes: what `mathtune doctor` reads from the machine. Each is a plain function returning JSON-able
# values, collected in `Probes` so that tests can replace any of them (a fake GPU, an old driver).

# CUDA builds of PyTorch on download.pytorch.org, per minor version (newest known set for later versions).
TORCH_CUDA_BUILDS = {
    (2, 4): ("11.8", "12.1", "12.4"), (2, 5): ("11.8", "12.1", "12.4"), (2, 6): ("11.8", "12.4", "12.6"),
    (2, 7): ("11.8", "12.6", "12.8"), (2, 8): ("12.6", "12.8", "12.9"), (2, 9): ("12.6", "12.8", "13.0"),
}
# Oldest Linux driver for each CUDA major version (minor version compatibility, NVIDIA release notes).
MIN_DRIVER = {11: (450, 80, 2), 12: (525, 60, 13), 13: (580,)}


def _numbers(text: str) -> tuple[int, ...]:
    import re

    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def torch_version() -> tuple[int, ...]:
    """The installed PyTorch's (major, minor, patch) from its package metadata, without importing it."""
    import importlib.metadata

    return _numbers(importlib.metadata.version("torch"))


def min_driver_for(cuda_build: str) -> tuple[int, ...] | None:
    """The oldest driver that runs a CUDA `cuda_build` ("12.8") program, or None if unknown."""
    return MIN_DRIVER.get(_numbers(cuda_build)[0]) if _numbers(cuda_build) else None


def cuda_tag(torch_version: str, driver: str | None) -> str | None:
    """The newest CUDA build of this PyTorch version that `driver` can run ("12.8"), or None."""
    if not driver:
        return None
    key = _numbers(torch_version)[:2]
    builds = TORCH_CUDA_BUILDS.get(key) or TORCH_CUDA_BUILDS[max(TORCH_CUDA_BUILDS)]
    runnable = [b for b in builds if _numbers(driver) >= (min_driver_for(b) or (999,))]
    return runnable[-1] if runnable else None


def torch_index_url(cuda: str) -> str:
    return f"https://download.pytorch.org/whl/cu{cuda.replace('.', '')}"


@functools.cache
def heap_trimmer() -> Callable[[], int] | None:
    """glibc's malloc_trim(0), which hands the free pages inside the heap back to the kernel; None
    where the C library is not glibc (Windows, macOS, musl). Looked up once: the doctor's memory plan
    asks for every plan it tries."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Hand the free pages inside the heap back to the kernel now (glibc's malloc_trim; False where
    the C library is another). For the end of a phase that freed far more than the next one holds:
    the default run's training left 2.4-2.6 GB of heap of which 0.9 GB was in use, and its scoring
    would otherwise run on top of that (Intel Xeon with AMX, 2 cores)."""
    trim = heap_trimmer()
    if trim is None:
        return False
    gc.collect()  # the training step's last tensors, if a reference cycle still holds them
    trim(0)
    return True


HEAP_TRIM_SECONDS = 0.2


def trim_heap_periodically(period: float = HEAP_TRIM_SECONDS) -> bool:
    """Give freed heap memory back to the kernel every `period` seconds, for the rest of the process
    (a daemon thread; ctypes lets go of the GIL during the call). False where glibc is not the C
    library, or when it is already running.

    Why: glibc keeps freed memory inside its heap for reuse. A 4-bit CPU run frees and allocates
    bitsandbytes' dequantized copy of each layer's weights in every pass, and the heap around those
    copies grows to 1.6x what the run holds at once, and stays there (benchmarks/qlora_cpu.py on an
    AMD EPYC, 2 cores: the 1.1B shape peaked at 3.52 GB of anonymous memory, 2.06 GB with this
    trimming; the Mistral-7B shape at 12.19 GB before (Intel Xeon), 7.25 GB with it). Capping the heap
    instead (MALLOC_MMAP_THRESHOLD_=1 MB, MALLOC_ARENA_MAX=2) saved as much at half the speed."""
    global _trimming
    trim = heap_trimmer()
    if trim is None or _trimming:
        return False
    _trimming = True

    def loop() -> None:
        while True:
            time.sleep(period)
            trim(0)

    threading.Thread(target=loop, name="mathtune-heap-trim", daemon=True).start()
    return True


_trimming = False


def cpu_model() -> str:
    """The processor's name as `lscpu` gives it ("AMD EPYC", "Intel(R) Xeon(R) ..."), for measurements."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def probe_system() -> dict:
    import platform
    import sys

    return {"os": f"{platform.system()} {platform.release()} {platform.machine()}", "python": platform.python_version(),
            "python_executable": sys.executable, "cpu_threads": os.cpu_count()}


def probe_torch() -> dict:
    """Version, build, CUDA state and each GPU as PyTorch sees them. A broken CUDA install raises
    from any of these calls: what could not be read is said in `cuda_error`, the rest is kept."""
    import warnings

    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken install raises anything (OSError for a missing .so)
        return {"installed": False, "error": f"{type(exc).__name__}: {exc}"}
    info = {"installed": True, "version": torch.__version__, "cuda_build": torch.version.cuda,
            "hip_build": getattr(torch.version, "hip", None), "cuda_available": False, "cuda_error": None,
            "threads": torch.get_num_threads(), "mps": False, "gpus": [],
            "cpu_kernels": torch.backends.cpu.get_cpu_capability(), "cpu_bf16": cpu_bf16_units()}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            info["cuda_available"] = bool(torch.cuda.is_available())
        if caught and not info["cuda_available"]:
            info["cuda_error"] = str(caught[0].message).strip()
        for i in range(torch.cuda.device_count() if info["cuda_available"] else 0):
            info["gpus"].append(_torch_gpu(torch, i))
    except Exception as exc:  # noqa: BLE001 - see the docstring
        info["cuda_error"] = f"{type(exc).__name__}: {exc}"
    try:
        info["mps"] = mps_available()
    except Exception:  # noqa: BLE001 - same for the MPS backend
        pass
    return info


def _torch_gpu(torch, i: int) -> dict:
    props = torch.cuda.get_device_properties(i)
    try:
        free, total = torch.cuda.mem_get_info(i)
    except RuntimeError:
        free, total = None, props.total_memory
    return {"name": props.name, "memory_total": total, "memory_free": free,
            "capability": f"{props.major}.{props.minor}", "bf16": props.major >= 8}


NVIDIA_SMI_SECONDS = 10
"""How long nvidia-smi may take to answer; a wedged driver makes it hang for minutes."""


def probe_nvidia_smi() -> dict | None:
    """Driver, its highest CUDA version and the GPUs from nvidia-smi; None when it is not installed.

    Whatever nvidia-smi answers (a failure, a hang, fields it cannot report such as "[N/A]", units,
    lines of another shape, bytes that are not UTF-8) ends in a dict: what could be read, plus
    `error` (why nothing could) or `unreadable` (the lines that could not be)."""
    import shutil

    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    query = [exe, "--query-gpu=name,memory.total,memory.free,driver_version", "--format=csv,noheader,nounits"]
    listing, error = _run_quietly(query)
    if error:
        return {"error": error, "gpus": []}
    gpus, drivers, unreadable = [], [], []
    for line in listing.splitlines():
        gpu, driver = _smi_gpu(line)
        if gpu is None:
            if line.strip():
                unreadable.append(line.strip()[:200])
            continue
        gpus.append(gpu)
        drivers.append(driver)
    banner, _ = _run_quietly([exe])  # only for "CUDA Version: 12.4"; the listing has the rest
    import re

    cuda = re.search(r"CUDA Version:\s*([\d.]+)", banner or "")
    info = {"driver": next((d for d in drivers if d), None), "cuda": cuda.group(1) if cuda else None, "gpus": gpus,
            "error": None if gpus else "nvidia-smi listed no GPU it could read"}
    if unreadable:
        info["unreadable"] = unreadable
    return info


def _run_quietly(command: list[str]) -> tuple[str | None, str | None]:
    """(stdout, None), or (None, why it failed): not started, timed out, non-zero exit."""
    import subprocess

    try:
        done = subprocess.run(command, capture_output=True, text=True, errors="replace",
                              timeout=NVIDIA_SMI_SECONDS, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"{Path(command[0]).name} did not answer within {NVIDIA_SMI_SECONDS} s (a hung driver?)"
    except OSError as exc:
        return None, f"{Path(command[0]).name} could not be run: {exc.strerror or exc}"
    if done.returncode != 0:
        said = (done.stdout + done.stderr).strip()
        return None, said.splitlines()[0][:300] if said else f"exit status {done.returncode}"
    return done.stdout, None


def _smi_gpu(line: str) -> tuple[dict | None, str | None]:
    """One line of the CSV listing -> (gpu, driver); (None, None) for a line of another shape.
    A memory nvidia-smi cannot report ("[N/A]", "[Not Supported]") is None."""
    parts = [part.strip() for part in line.split(",")]
    if len(parts) != 4 or not parts[0]:
        return None, None
    name, total, free, driver = parts
    memory = [_mib(total), _mib(free)]
    if memory[0] is None and not total.startswith("["):
        return None, None  # not a field nvidia-smi leaves out, but text of another shape
    return ({"name": name, "memory_total": memory[0], "memory_free": memory[1]},
            driver if _numbers(driver) else None)


def _mib(text: str) -> int | None:
    import re

    found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(?:MiB)?", text)
    return int(float(found.group(1))) << 20 if found else None


def probe_bitsandbytes() -> dict:
    """Installed? Importable? Does a 4-bit NF4 quantization round trip run, on the GPU where PyTorch
    has one, else on the CPU (bitsandbytes 0.48+ runs NF4 and its 8-bit optimizers there)?"""
    import importlib.metadata

    if not bitsandbytes_available():
        return {"installed": False}
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        version = None  # a bitsandbytes folder on the path without its package metadata
    device = "cpu"
    try:
        import bitsandbytes.functional as bnbf
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        ones = torch.ones(64, device=device, dtype=torch.float16 if device == "cuda" else torch.float32)
        packed, state = bnbf.quantize_4bit(ones, quant_type="nf4")
        if not torch.allclose(bnbf.dequantize_4bit(packed, state).float().cpu(), ones.float().cpu()):
            raise RuntimeError("an NF4 round trip of ones does not give ones back")
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a broken bitsandbytes raises anything (old ones exit)
        return {"installed": True, "version": version, "usable": False, "device": device,
                "error": f"{type(exc).__name__}: {exc}"}
    return {"installed": True, "version": version, "usable": True, "device": device, "error": None}


def probe_versions() -> dict:
    import importlib.metadata

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "gguf", "math-verify", "bitsandbytes"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def probe_memory() -> dict:
    """RAM in bytes: /proc/meminfo on Linux, sysconf elsewhere."""
    try:
        with open("/proc/meminfo") as fh:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh if line.split()}
        return {"total": fields["MemTotal"], "available": fields.get("MemAvailable", fields.get("MemFree"))}
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return {"total": None, "available": None}
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        available = None
    return {"total": total, "available": available}


def probe_disk_free(path: Path) -> int | None:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""

    return free_bytes(Path(path).expanduser())


@dataclass(frozen=True)
class Probes:
    system: Callable[[], dict] = probe_system
    torch: Callable[[], dict] = probe_torch
    nvidia_smi: Callable[[], dict | None] = probe_nvidia_smi
    bitsandbytes: Callable[[], dict] = probe_bitsandbytes
    versions: Callable[[], dict] = probe_versions
    memory: Callable[[], dict] = probe_memory
    disk_free: Callable[[Path], int | None] = probe_disk_free


PROBES = Probes()
