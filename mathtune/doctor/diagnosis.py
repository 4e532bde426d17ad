"""What is wrong with this machine's PyTorch/CUDA install, and the command that fixes it: `diagnose`.

    findings, device, usable = diagnose(gather(PROBES, Path(".")))    # mathtune/doctor/doctor.py gathers

The facts come from the probes (mathtune/hardware.py); each check in CHECKS reads them for one
concern (a working GPU, a GPU PyTorch cannot use and why, CPU-only, Apple MPS, bitsandbytes) and
returns its findings, so a newcomer reads one rule at a time and a test plays any machine.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mathtune.config import TrainConfig
from mathtune.hardware import cuda_tag, min_driver_for, torch_index_url


@dataclass
class Finding:
    level: str
    """'ok', 'info', 'warning' or 'error'"""
    message: str
    fix: str | None = None


def diagnose(facts: dict[str, Any], requested: str = "auto", need_4bit: bool = False) -> tuple[list[Finding], str, bool]:
    """Findings, the device a run would use, and whether the requested device is usable.

    A PyTorch that does not import is the only finding, since every check reads torch's facts;
    otherwise the findings are those of each check in CHECKS, in that order: the GPU first, then
    what trains without one, then bitsandbytes on top."""
    torch_facts, smi, bnb = facts["torch"], facts["nvidia_smi"], facts["bitsandbytes"]
    pip = f"{facts['system'].get('python_executable') or sys.executable} -m pip"
    if not torch_facts.get("installed"):
        return [Finding("error", f"PyTorch is not importable ({torch_facts.get('error')})",
                        f"{pip} install torch  # or: bash scripts/setup.sh")], "none", False
    m = Machine(torch_facts, smi, bnb, facts["system"], pip, need_4bit)
    findings = [finding for check in CHECKS for finding in check(m)]
    device = best_device(m) if requested == "auto" else requested
    return findings, device, usable_device(m, device)


@dataclass
class Machine:
    """What diagnose's checks read: the torch, nvidia-smi, bitsandbytes and system facts of a machine
    whose PyTorch imports, and the conclusions several checks share."""

    torch: dict[str, Any]
    smi: dict[str, Any] | None
    bnb: dict[str, Any]
    system: dict[str, Any]
    pip: str
    """the command that runs this Python's pip, for the fixes"""
    need_4bit: bool
    """whether the planned run loads the model in 4 bits (bitsandbytes problems are errors then)"""
    cuda_ok: bool = field(init=False)
    """PyTorch can use a CUDA GPU"""
    nvidia_present: bool = field(init=False)
    """nvidia-smi lists a GPU, whether PyTorch can use it or not"""
    build: str | None = field(init=False)
    """the CUDA version PyTorch was built for; None for a CPU-only or ROCm build"""
    version: str = field(init=False)
    """the PyTorch version without its local part (2.7.1 of 2.7.1+cu128), as pip pins it"""

    def __post_init__(self) -> None:
        self.cuda_ok = bool(self.torch.get("cuda_available")) and bool(self.torch.get("gpus"))
        self.nvidia_present = bool(self.smi and self.smi.get("gpus"))
        self.build = self.torch.get("cuda_build")
        self.version = self.torch["version"].split("+")[0]


def cuda_works(m: Machine) -> list[Finding]:
    """The GPUs PyTorch uses, and those among them without bf16."""
    if not m.cuda_ok:
        return []
    gpus = m.torch["gpus"]
    names = ", ".join(g["name"] for g in gpus)
    return [Finding("ok", f"CUDA works: {len(gpus)} GPU{'s' * (len(gpus) != 1)} ({names})"),
            *(Finding("info", f"{g['name']} (compute capability {g['capability']}) has no bf16: training runs in "
                      "float16 (model.dtype auto picks it)") for g in gpus if not g.get("bf16"))]


def gpu_unusable(m: Machine) -> list[Finding]:
    """Why PyTorch cannot use a GPU that is there: the first of the explanations below that applies."""
    if m.cuda_ok:
        return []
    for explain in (rocm_without_gpu, cpu_only_wheel, driver_too_old, cuda_unusable, nvidia_smi_fails):
        finding = explain(m)
        if finding is not None:
            return [finding]
    return []


def rocm_without_gpu(m: Machine) -> Finding | None:
    if not m.torch.get("hip_build"):
        return None
    return Finding("error", f"ROCm build of PyTorch (HIP {m.torch['hip_build']}) but no usable AMD GPU",
                   "check `rocm-smi` and that your user is in the 'render' and 'video' groups")


def cpu_only_wheel(m: Machine) -> Finding | None:
    """A CPU-only PyTorch beside an NVIDIA GPU: the reinstall command for the CUDA build its driver takes."""
    if not m.nvidia_present or m.build:
        return None
    driver = m.smi.get("driver")
    tag = cuda_tag(m.version, driver)
    fix = (f"{m.pip} install --force-reinstall torch=={m.version} --index-url {torch_index_url(tag)}" if tag else
           "update the NVIDIA driver (it is older than any CUDA build of PyTorch supports)")
    return Finding("error", f"PyTorch {m.torch['version']} is a CPU-only build, but this machine has an NVIDIA GPU "
                   f"({m.smi['gpus'][0]['name']}, driver {driver}): the GPU is unused", fix)


def driver_too_old(m: Machine) -> Finding | None:
    """A CUDA build of PyTorch newer than the NVIDIA driver: update the driver, or install an older build."""
    if not (m.nvidia_present and m.build):
        return None
    driver = m.smi.get("driver")
    need = min_driver_for(m.build)
    if not (need is not None and driver and _version_tuple(driver) < need):
        return None
    tag = cuda_tag(m.version, driver)
    alternative = (f"\n     or install a PyTorch build this driver supports: {m.pip} install --force-reinstall "
                   f"torch=={m.version} --index-url {torch_index_url(tag)}") if tag else ""
    return Finding("error", f"The NVIDIA driver {driver} is too old for PyTorch's CUDA {m.build} build "
                   f"(needs {'.'.join(map(str, need))} or newer)",
                   "update the driver (Ubuntu: sudo ubuntu-drivers install; others: https://www.nvidia.com/drivers)"
                   + alternative)


def cuda_unusable(m: Machine) -> Finding | None:
    """A CUDA build and a driver new enough for it, and still no GPU: torch's own reason."""
    if not (m.nvidia_present and m.build):
        return None
    reason = m.torch.get("cuda_error") or "torch.cuda.is_available() is False"
    return Finding("error", f"nvidia-smi sees {m.smi['gpus'][0]['name']} but PyTorch (CUDA {m.build}) cannot use it: "
                   f"{reason}", "check CUDA_VISIBLE_DEVICES, then reboot after a driver update (the loaded kernel "
                   "module must match the installed driver)")


def nvidia_smi_fails(m: Machine) -> Finding | None:
    if not (m.smi and m.smi.get("error")):
        return None
    return Finding("error", f"nvidia-smi is installed but fails: {m.smi['error']}",
                   "reinstall or reload the NVIDIA driver (a reboot after a driver update usually fixes this)")


def cpu_only_machine(m: Machine) -> list[Finding]:
    """No GPU of any kind: what a CPU trains, and in which precision."""
    if m.cuda_ok or m.torch.get("mps") or m.nvidia_present:
        return []
    threads = m.system.get("cpu_threads") or 1
    return [Finding("info", f"No GPU: training runs on the CPU ({threads} threads), in {cpu_precision(m.torch)}. The "
                    f"default run (SmolLM2-135M, {TrainConfig().max_steps} steps) fits a CPU; a 7B model needs a GPU "
                    "(`mathtune doctor --model FILE` estimates its memory). `mathtune data` and `eval` work as well.")]


def apple_mps(m: Machine) -> list[Finding]:
    if not m.torch.get("mps"):
        return []
    return [Finding("ok", "Apple MPS is available (training in float32; no 4-bit QLoRA on MPS)")]


def qlora_support(m: Machine) -> list[Finding]:
    """Whether 4-bit QLoRA and 8-bit optimizers work (on the GPU, else on the CPU); a problem is an
    error when the run loads in 4 bits."""
    bnb = m.bnb
    if bnb.get("installed"):
        if not bnb.get("usable"):
            return [Finding("error" if m.need_4bit else "warning",
                            f"bitsandbytes {bnb.get('version')} does not work: {bnb.get('error')}",
                            f"{m.pip} install --upgrade bitsandbytes")]
        where = " on the CPU (NF4 base, products in the CPU's precision; slower than a GPU)" * (bnb.get("device") == "cpu")
        return [Finding("ok", f"bitsandbytes {bnb['version']} works: QLoRA available{where}")]
    if m.need_4bit or m.cuda_ok:
        return [Finding("error" if m.need_4bit else "info", "bitsandbytes is not installed: no 4-bit QLoRA or 8-bit "
                        "optimizers", f"{m.pip} install bitsandbytes  # or: bash scripts/setup.sh")]
    return []


CHECKS: tuple[Callable[[Machine], list[Finding]], ...] = (
    cuda_works, gpu_unusable, cpu_only_machine, apple_mps, qlora_support)
"""diagnose's checks, in the order their findings are reported; each looks at one concern."""


def best_device(m: Machine) -> str:
    """What `auto` means here. An NVIDIA GPU that PyTorch cannot use is the best device all the same:
    auto then fails rather than quietly training on the CPU."""
    return "cuda" if m.cuda_ok or m.nvidia_present else ("mps" if m.torch.get("mps") else "cpu")


def usable_device(m: Machine, device: str) -> bool:
    """Whether a run can train on `device`, with the 4-bit loading it plans."""
    on_device = {"cuda": m.cuda_ok, "mps": bool(m.torch.get("mps")), "cpu": True}[device]
    four_bit = not m.need_4bit or (device in ("cuda", "cpu") and bool(m.bnb.get("usable")))
    return on_device and four_bit


def cpu_precision(t: dict[str, Any]) -> str:
    """How `model.dtype: auto` trains on this CPU, and why (from probe_torch's facts)."""
    if t.get("cpu_bf16"):
        return f"bfloat16 (the cores have {t['cpu_bf16']} bf16 units; LoRA weights and optimizer state in float32)"
    return "float32 (the cores have no bf16 units, AMX or AVX512-BF16, and emulated bf16 is far slower)"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])
