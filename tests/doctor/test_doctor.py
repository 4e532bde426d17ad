"""`mathtune doctor` on faked machines: diagnoses, the exact fix commands, exit codes, estimates."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from mathtune.cli import main
from mathtune.doctor.doctor import run_doctor
from mathtune.hardware import PROBES, Probes, cuda_tag, probe_disk_free, probe_memory, probe_nvidia_smi, probe_torch
from tests.doctor.test_memory import MATHSTRAL

GIB = 1 << 30
PY = "/venv/bin/python"


def machine(torch=None, smi=None, bnb=None, ram=64 * GIB) -> Probes:
    return Probes(
        system=lambda: {"os": "Linux 6.8 x86_64", "python": "3.11.7", "python_executable": PY, "cpu_threads": 16},
        torch=lambda: torch or cpu_torch(),
        nvidia_smi=lambda: smi,
        bitsandbytes=lambda: bnb or {"installed": False},
        versions=lambda: {"torch": (torch or cpu_torch())["version"], "transformers": "5.0.0", "peft": "0.17.0"},
        memory=lambda: {"total": ram, "available": ram - GIB},
        disk_free=lambda path: 500 * GIB,
    )


def cpu_torch(version="2.7.1+cpu"):
    return {"installed": True, "version": version, "cuda_build": None, "hip_build": None, "cuda_available": False,
            "cuda_error": None, "threads": 16, "mps": False, "gpus": [], "cpu_kernels": "AVX2", "cpu_bf16": None}


def cuda_torch(gpu_gib=24, name="NVIDIA GeForce RTX 4090", capability="8.9", free_gib=None):
    gpu = {"name": name, "memory_total": gpu_gib * GIB, "memory_free": (free_gib or gpu_gib - 0.5) * GIB,
           "capability": capability, "bf16": int(capability.split(".")[0]) >= 8}
    return {**cpu_torch("2.7.1+cu128"), "cuda_build": "12.8", "cuda_available": True, "gpus": [gpu]}


def smi(driver="570.86.15", name="NVIDIA GeForce RTX 4090", gib=24):
    return {"driver": driver, "cuda": "12.8", "gpus": [{"name": name, "memory_total": gib * GIB,
                                                       "memory_free": gib * GIB - GIB}], "error": None}


BNB_OK = {"installed": True, "version": "0.45.5", "usable": True, "error": None}


def doctor(probes, *args, **kwargs) -> tuple[int, str]:
    lines = []
    code = run_doctor(*args, probes=probes, out=lines.append, **kwargs)
    return code, "\n".join(lines)


def test_a_working_gpu_machine_passes():
    code, text = doctor(machine(cuda_torch(), smi(), BNB_OK))
    assert code == 0
    assert "[ok] CUDA works: 1 GPU (NVIDIA GeForce RTX 4090)" in text
    assert "gpu 0         NVIDIA GeForce RTX 4090: 24.0 GiB, 23.5 GiB free, compute capability 8.9, bf16 yes" in text
    assert "[ok] bitsandbytes 0.45.5 works: QLoRA available" in text
    assert "device auto -> cuda: usable" in text


def test_cpu_only_wheel_beside_an_nvidia_driver_gets_the_pip_command_for_a_matching_cuda_build():
    probes = machine(cpu_torch("2.7.1+cpu"), smi("550.54.14", "NVIDIA GeForce RTX 3060", 12))
    code, text = doctor(probes)
    assert code == 1  # auto: the best device here is the GPU, and it is unusable
    assert ("[error] PyTorch 2.7.1+cpu is a CPU-only build, but this machine has an NVIDIA GPU "
            "(NVIDIA GeForce RTX 3060, driver 550.54.14): the GPU is unused") in text
    assert (f"fix: {PY} -m pip install --force-reinstall torch==2.7.1 "
            "--index-url https://download.pytorch.org/whl/cu128") in text
    assert "device auto -> cuda: NOT usable" in text
    # Asking for the CPU explicitly is fine: it works, and the diagnosis is still shown.
    code, text = doctor(probes, device="cpu")
    assert code == 0 and "CPU-only build" in text


@pytest.mark.parametrize("torch_version,driver,tag", [
    ("2.7.1", "550.54.14", "12.8"), ("2.9.0", "580.82.07", "13.0"), ("2.9.0", "560.35.03", "12.8"),
    ("2.6.0", "470.182.03", "11.8"), ("2.8.0", "470.182.03", None), ("2.13.0", "590.10", "13.0"),
    ("2.4.1", "535.104.05", "12.4"), ("2.7.1", None, None),
])
def test_the_cuda_build_matches_the_driver(torch_version, driver, tag):
    assert cuda_tag(torch_version, driver) == tag


def test_a_driver_too_old_for_the_cuda_build():
    torch = {**cuda_torch(), "cuda_available": False, "gpus": [],
             "cuda_error": "The NVIDIA driver on your system is too old (found version 11040)."}
    code, text = doctor(machine(torch, smi("470.182.03")))
    assert code == 1
    assert "[error] The NVIDIA driver 470.182.03 is too old for PyTorch's CUDA 12.8 build (needs 525.60.13 or newer)" in text
    assert "fix: update the driver (Ubuntu: sudo ubuntu-drivers install" in text
    assert f"{PY} -m pip install --force-reinstall torch==2.7.1 --index-url https://download.pytorch.org/whl/cu118" in text


def test_a_gpu_torch_cannot_use_for_another_reason_shows_torchs_own_message():
    torch = {**cuda_torch(), "cuda_available": False, "gpus": [], "cuda_error": "CUDA unknown error"}
    code, text = doctor(machine(torch, smi("570.86.15")), device="cuda")
    assert code == 1 and "cannot use it: CUDA unknown error" in text and "CUDA_VISIBLE_DEVICES" in text


def test_bitsandbytes_without_cuda_runs_qlora_on_the_cpu():
    bnb = {"installed": True, "version": "0.50.2", "usable": True, "device": "cpu", "error": None}
    code, text = doctor(machine(cpu_torch(), None, bnb))
    assert code == 0
    assert "[ok] bitsandbytes 0.50.2 works: QLoRA available on the CPU" in text
    broken = {**bnb, "usable": False, "error": "RuntimeError: no CPU kernel"}
    code, text = doctor(machine(cpu_torch(), None, broken))
    assert code == 0  # the CPU works; QLoRA is what does not
    assert "[warning] bitsandbytes 0.50.2 does not work: RuntimeError: no CPU kernel" in text


def test_a_4bit_plan_on_a_cpu_machine_is_usable_with_a_working_bitsandbytes(tmp_path):
    config = tmp_path / "qlora.yaml"
    config.write_text("model:\n  load_in_4bit: true\n")
    bnb = {"installed": True, "version": "0.50.2", "usable": True, "device": "cpu", "error": None}
    code, text = doctor(machine(cpu_torch(), None, bnb), config=config)
    assert code == 0 and "device auto -> cpu: usable" in text
    assert doctor(machine(cpu_torch(), None, {**bnb, "usable": False, "error": "x"}), config=config)[0] == 1


def test_a_4bit_plan_needs_cuda_and_bitsandbytes(tmp_path):
    config = tmp_path / "qlora.yaml"
    config.write_text("model:\n  load_in_4bit: true\n")
    code, text = doctor(machine(cuda_torch(), smi(), {"installed": False}), config=config)
    assert code == 1
    assert "[error] bitsandbytes is not installed" in text and f"fix: {PY} -m pip install bitsandbytes" in text
    assert doctor(machine(cuda_torch(), smi(), BNB_OK), config=config)[0] == 0


def test_no_gpu_at_all_says_what_works_on_the_cpu():
    code, text = doctor(machine())
    assert code == 0
    assert "[info] No GPU: training runs on the CPU (16 threads), in float32" in text and "54 steps" in text
    code, text = doctor(machine(), device="cuda")
    assert code == 1 and "device cuda: NOT usable" in text


def test_a_cpu_with_bf16_units_trains_in_bfloat16_and_the_estimate_counts_2_bytes(mathstral_dir):
    code, text = doctor(machine(), model=str(mathstral_dir), device="cpu")
    assert "[info] No GPU: training runs on the CPU (16 threads), in float32 (the cores have no bf16 units" in text
    assert "cpu           AVX2 kernels, bf16 units: none" in text and "float32 weights" in text
    code, text = doctor(machine({**cpu_torch(), "cpu_kernels": "AVX512", "cpu_bf16": "AMX"}), model=str(mathstral_dir),
                        device="cpu")
    assert "in bfloat16 (the cores have AMX bf16 units; LoRA weights and optimizer state in float32)" in text
    assert "cpu           AVX512 kernels, bf16 units: AMX" in text and "16-bit weights" in text


def test_json_output(tmp_path):
    code, text = doctor(machine(cpu_torch(), smi("550.54.14")), as_json=True)
    report = json.loads(text)
    assert code == 1 and report["ok"] is False
    assert report["device"] == {"requested": "auto", "resolved": "cuda", "usable": False}
    assert report["findings"][0]["level"] == "error" and "--index-url" in report["findings"][0]["fix"]
    assert report["memory"]["total"] == 64 * GIB and report["disk"]["free"] == 500 * GIB


@pytest.fixture
def mathstral_dir(tmp_path) -> Path:
    folder = tmp_path / "mathstral"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MATHSTRAL))
    return folder


def test_preflight_counts_bf16_weights_on_a_cpu_with_bf16_units(mathstral_dir, monkeypatch):
    """7.25B parameters on a 24 GiB CPU machine: float32 weights (29 GB) do not fit; where the cores
    have bf16 units `model.dtype: auto` loads them in bf16 (14.5 GB) and the run is let through."""
    from mathtune.config import load_config
    from mathtune.doctor.doctor import preflight
    from mathtune.errors import ModelError
    from mathtune.model.load import ModelSource

    cfg = load_config(None, {"model.device": "cpu", "train.gradient_checkpointing": True}, environ={},
                      check_machine=False)
    source = ModelSource("folder", str(mathstral_dir), str(mathstral_dir))
    monkeypatch.setattr("mathtune.hardware.cpu_bf16_units", lambda: None)
    with pytest.raises(ModelError, match=r"7\.25B parameters\): this run needs about"):
        preflight(cfg, source, "cpu", probes=machine(ram=24 * GIB))
    monkeypatch.setattr("mathtune.hardware.cpu_bf16_units", lambda: "AMX")
    preflight(cfg, source, "cpu", probes=machine(ram=24 * GIB))


def test_mathstral_qlora_estimate_on_a_12_gb_gpu(mathstral_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model: {load_in_4bit: true}\ndata: {max_seq_length: 1024}\n"
                      "train: {batch_size: 1, gradient_checkpointing: true, optimizer: paged_adamw_8bit}\n")
    rtx3060 = machine(cuda_torch(12, "NVIDIA GeForce RTX 3060", "8.6", free_gib=11.5), smi(gib=12), BNB_OK)
    code, text = doctor(rtx3060, model=str(mathstral_dir), config=config)
    assert code == 0
    assert "(7.25B parameters, 32 layers, hidden 4096, from the config.json)" in text
    assert "plan: cuda, 4-bit NF4 weights, LoRA r=16, batch 1 x 1024 tokens, gradient checkpointing on" in text
    assert "  total          6.78 GiB  vs NVIDIA GeForce RTX 3060: 11.5 GiB free of 12.0 GiB: fits" in text


def test_a_plan_that_does_not_fit_gets_the_settings_that_would(mathstral_dir):
    config = Path(__file__).parents[2] / "configs" / "mathstral-7b-qlora.yaml"  # batch 4 x 1024
    small = machine(cuda_torch(8, "NVIDIA GeForce RTX 3070", "8.6", free_gib=7.5), smi(gib=8), BNB_OK)
    code, text = doctor(small, model=str(mathstral_dir), config=config)
    assert code == 1
    assert "does NOT fit" in text and "fits with: --set train.batch_size=1 (about 6.8 GiB)" in text
    assert "device cuda: usable, but the planned run does not fit" in text
    code, text = doctor(machine(cuda_torch(4, "Quadro", "7.5", free_gib=3.5), smi(gib=4), BNB_OK),
                        model=str(mathstral_dir), config=config)
    assert code == 1 and "no setting makes it fit here" in text


def test_the_real_probes_read_this_machine(tmp_path):
    memory = probe_memory()
    assert memory["total"] > memory["available"] > 0
    assert probe_disk_free(tmp_path / "not" / "yet" / "made") > 0
    info = probe_torch()
    assert info["installed"] and info["version"] and isinstance(info["gpus"], list)
    assert main(["doctor", "--json"]) in (0, 1)  # whatever this machine is, the command answers


def test_nvidia_smi_output_is_parsed(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "" ]; then echo "| NVIDIA-SMI 550.54.14   Driver Version: 550.54.14   CUDA Version: 12.4 |"; exit 0; fi\n'
        'echo "NVIDIA GeForce RTX 3060, 12288, 11900, 550.54.14"\n'
        'echo "NVIDIA GeForce RTX 3060, 12288, 12000, 550.54.14"\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    info = probe_nvidia_smi()
    assert info["driver"] == "550.54.14" and info["cuda"] == "12.4" and info["error"] is None
    assert info["gpus"][0] == {"name": "NVIDIA GeForce RTX 3060", "memory_total": 12288 << 20, "memory_free": 11900 << 20}
    assert len(info["gpus"]) == 2
    fake.write_text("#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"\n"
                    "exit 9\n")
    assert probe_nvidia_smi() == {"error": "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.",
                                  "gpus": []}


def test_default_probes_are_the_real_functions():
    assert PROBES.torch is probe_torch and PROBES.nvidia_smi is probe_nvidia_smi


# ---------------------------------------------------------------------------------------------
# Probes on a broken machine: whatever nvidia-smi, CUDA or bitsandbytes do, the doctor answers.


def fake_nvidia_smi(folder: Path, monkeypatch, listing: str, banner: str = "CUDA Version: 12.4") -> None:
    """An nvidia-smi on PATH whose query prints `listing` (shell code) and whose banner prints `banner`."""
    fake = folder / "nvidia-smi"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "" ]; then echo "{banner}"; exit 0; fi\n{listing}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")


SMI_OUTPUTS = {
    "fields it cannot report": ('echo "NVIDIA A100-SXM4-40GB, [N/A], [Not Supported], 550.54.14"',
                                {"driver": "550.54.14", "gpus": [{"name": "NVIDIA A100-SXM4-40GB", "memory_total": None,
                                                                  "memory_free": None}]}),
    "units": ('echo "NVIDIA L4, 23034 MiB, 22000 MiB, 550.54.14"',
              {"gpus": [{"name": "NVIDIA L4", "memory_total": 23034 << 20, "memory_free": 22000 << 20}]}),
    "extra and malformed lines": ('echo "No devices were found"; echo "Tesla T4, 15360, 15000, 535.1"; echo "x, y"; echo',
                                  {"driver": "535.1", "unreadable": ["No devices were found", "x, y"],
                                   "gpus": [{"name": "Tesla T4", "memory_total": 15360 << 20,
                                             "memory_free": 15000 << 20}]}),
    "not UTF-8": (r"printf 'Tesla \377\376, 15360, 15000, 535.1\n'", {"driver": "535.1"}),
    "an unreadable driver version": ('echo "Tesla T4, 15360, 15000, [N/A]"', {"driver": None}),
    "no GPU lines": ('echo "Unable to determine the device handle for GPU0000:00:1E.0: Unknown Error"',
                     {"gpus": [], "error": "nvidia-smi listed no GPU it could read"}),
    "non-zero exit, no output": ("exit 3", {"gpus": [], "error": "exit status 3"}),
    "non-zero exit on stderr": ('echo "Failed to initialize NVML: Driver/library version mismatch" >&2; exit 18',
                                {"error": "Failed to initialize NVML: Driver/library version mismatch"}),
}


@pytest.mark.parametrize("listing, expected", SMI_OUTPUTS.values(), ids=SMI_OUTPUTS.keys())
def test_odd_nvidia_smi_output_is_read_as_far_as_it_goes(tmp_path, monkeypatch, listing, expected):
    fake_nvidia_smi(tmp_path, monkeypatch, listing)
    info = probe_nvidia_smi()
    assert {key: info.get(key) for key in expected} == expected
    # ... and the doctor's report and diagnosis read it without failing.
    code, text = doctor(machine(cpu_torch(), info))
    assert code in (0, 1) and "nvidia-smi" in text


def test_a_hanging_nvidia_smi_is_given_up_on(tmp_path, monkeypatch):
    import mathtune.hardware as hardware

    fake_nvidia_smi(tmp_path, monkeypatch, "sleep 30")
    monkeypatch.setattr(hardware, "NVIDIA_SMI_SECONDS", 1)
    started = time.perf_counter()
    info = probe_nvidia_smi()
    assert time.perf_counter() - started < 5
    assert info == {"error": "nvidia-smi did not answer within 1 s (a hung driver?)", "gpus": []}
    code, text = doctor(machine(cpu_torch(), info))
    assert "nvidia-smi is installed but fails: nvidia-smi did not answer within 1 s" in text


def test_a_cuda_install_that_raises_is_reported_and_the_rest_is_read(monkeypatch):
    import torch

    def broken(*args):
        raise RuntimeError("CUDA driver initialization failed, you might not have a CUDA gpu.")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    info = probe_torch()
    assert info["installed"] and info["version"] == torch.__version__ and info["threads"] > 0
    assert info["cuda_available"] is False and info["gpus"] == []
    assert info["cuda_error"] == "RuntimeError: CUDA driver initialization failed, you might not have a CUDA gpu."
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", broken)
    info = probe_torch()
    assert info["gpus"] == [] and info["cuda_error"].startswith("RuntimeError: CUDA driver initialization failed")


def test_a_probe_that_raises_is_named_and_the_others_still_report():
    def broken():
        raise OSError(5, "Input/output error")

    probes = Probes(**{**machine(cuda_torch(), smi(), BNB_OK).__dict__, "memory": broken, "system": broken})
    code, text = doctor(probes)
    assert code == 0  # the GPU works; RAM and the OS could not be read
    assert "unreadable    the memory probe failed: OSError: [Errno 5] Input/output error" in text
    assert "unreadable    the system probe failed" in text
    assert "[ok] CUDA works" in text and "RAM unknown" in text


BROKEN_BNB = {
    "raises at import": "raise RuntimeError('CUDA Setup failed despite GPU being available.')",
    "exits at import": "import sys; sys.exit('bitsandbytes was compiled without GPU support')",
}


@pytest.mark.parametrize("body", BROKEN_BNB.values(), ids=BROKEN_BNB.keys())
def test_mathtune_doctor_survives_a_broken_bitsandbytes_and_an_odd_nvidia_smi(tmp_path, monkeypatch, body):
    import subprocess
    import sys

    (tmp_path / "site" / "bitsandbytes").mkdir(parents=True)
    (tmp_path / "site" / "bitsandbytes" / "__init__.py").write_text(body + "\n")
    (tmp_path / "site" / "bitsandbytes" / "functional.py").write_text("")
    fake_nvidia_smi(tmp_path, monkeypatch, 'echo "Tesla T4, [N/A], [N/A], 535.1"; echo "garbage"; exit 0')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "mathtune", "doctor", "--json"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode in (0, 1) and "Traceback" not in done.stderr, done.stderr
    report = json.loads(done.stdout)
    assert report["bitsandbytes"]["installed"] and report["bitsandbytes"]["usable"] is False
    assert report["nvidia_smi"]["gpus"] == [{"name": "Tesla T4", "memory_total": None, "memory_free": None}]
    assert report["nvidia_smi"]["unreadable"] == ["garbage"]


def test_the_unused_gpu_warning_before_training_is_the_doctors_finding_and_fix():
    from mathtune.doctor.doctor import unused_gpu_warning

    probes = machine(cpu_torch("2.7.1+cpu"), smi("550.54.14", "NVIDIA GeForce RTX 3060", 12))
    text = unused_gpu_warning("auto", "cpu", probes)
    assert text.startswith("model.device auto trains on the CPU here: PyTorch 2.7.1+cpu is a CPU-only build, but this "
                           "machine has an NVIDIA GPU (NVIDIA GeForce RTX 3060, driver 550.54.14): the GPU is unused.")
    assert (f"fix: {PY} -m pip install --force-reinstall torch==2.7.1 "
            "--index-url https://download.pytorch.org/whl/cu128") in text
    assert unused_gpu_warning("cpu", "cpu", probes) is None  # the CPU on purpose
    assert unused_gpu_warning("auto", "cpu", machine(cpu_torch(), None)) is None  # no NVIDIA GPU: nothing to say
    assert unused_gpu_warning("auto", "cuda", machine(cuda_torch(), smi())) is None


def test_training_on_the_cpu_beside_an_unused_nvidia_gpu_warns_first_and_records_it(tmp_path, tiny_llama_dir,
                                                                                    monkeypatch, caplog):
    import logging

    from mathtune.train.recipe import train
    from tests.train.test_recipe import tiny_run_config

    # This machine's PyTorch is a CPU-only build; an nvidia-smi on PATH plays the GPU it leaves unused.
    fake_nvidia_smi(tmp_path, monkeypatch, 'echo "NVIDIA GeForce RTX 3060, 12288, 11900, 550.54.14"')
    cfg = tiny_run_config(tmp_path, tiny_llama_dir, max_steps=1)
    cfg.eval.at_end = False
    with caplog.at_level(logging.INFO, logger="mathtune"):
        summary = train(cfg).summary
    (warning,) = summary["warnings"]
    assert warning.startswith("model.device auto trains on the CPU here: PyTorch ")
    assert "but this machine has an NVIDIA GPU (NVIDIA GeForce RTX 3060, driver 550.54.14): the GPU is unused" in warning
    assert "fix: " in warning and "--index-url https://download.pytorch.org/whl/cu" in warning
    assert f"WARNING: {warning}" in caplog.text
    assert caplog.text.index(f"WARNING: {warning}") < caplog.text.index("Evaluating on")  # before training starts
    (tmp_path / "cpu").mkdir()
    cfg2 = tiny_run_config(tmp_path / "cpu", tiny_llama_dir, max_steps=1)
    cfg2.eval.at_end, cfg2.model.device = False, "cpu"
    assert train(cfg2).summary["warnings"] == []  # the CPU on purpose: nothing to say


def test_doctor_json_is_one_json_document_on_this_machine():
    """Nothing but the report on stdout: bitsandbytes' CPU backend logs a warning when it is imported
    (the hub kernel it looks for is out of reach), which `mathtune doctor --json` must not print."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mathtune", "doctor", "--json"], capture_output=True, text=True,
                          cwd=Path(__file__).parents[2], timeout=120)
    report = json.loads(done.stdout)
    assert {"system", "torch", "bitsandbytes", "findings", "device"} <= set(report)
