"""Several processes on one run: who writes, what the run folder is called, which engine holds the weights.

    torchrun --nproc_per_node 2 -m mathtune train --config run.yaml          # CPU: DDP over gloo
    accelerate launch --config_file configs/accelerate/ddp.yaml -m mathtune train --config run.yaml
    accelerate launch --config_file configs/accelerate/fsdp.yaml -m mathtune train --config run.yaml

mathtune has no launcher of its own: torchrun or `accelerate launch` starts the processes and
transformers' Trainer (through accelerate) runs DDP, FSDP or DeepSpeed. What it adds is the glue a
recipe needs around the Trainer: one run folder name for all ranks, files written by rank 0 only,
and knowing when the weights are spread over the processes (FSDP, DeepSpeed ZeRO-3), so that saving
gathers them on every rank and generation is not attempted on rank 0 alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mathtune.errors import MathtuneError

if TYPE_CHECKING:
    from accelerate import PartialState

    from mathtune.config import Config


def process_state(device: str) -> PartialState:
    """accelerate's process state, set up as Trainer will set it up for `device`.

    Trainer asks for a CPU state (`use_cpu`) on CPU; a plain `PartialState()` there sees no GPU
    backend and reports a single process on every rank, so each rank would think it is rank 0.
    """
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu")


def engine() -> str:
    """What `accelerate launch` asked for: 'fsdp', 'deepspeed-zero1/2/3' or 'ddp' (also torchrun, one process)."""
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return f"deepspeed-zero{os.environ.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '2')}"
    return "ddp"


def shards_parameters() -> bool:
    """True where each process holds only a slice of the weights (FSDP, DeepSpeed ZeRO-3)."""
    return engine() in ("fsdp", "deepspeed-zero3")


def engine_places_model() -> bool:
    """FSDP and DeepSpeed move (their shard of) the model to the GPU themselves; loading it there
    first would put the whole model on every GPU."""
    return engine() != "ddp"


def launch_problems(cfg: Config) -> list[str]:
    """Combinations the engines cannot run, said before any model is loaded."""
    name = engine()
    problems = []
    if name != "ddp" and cfg.model.load_in_4bit:
        problems.append(f"model.load_in_4bit: QLoRA runs on one GPU or under DDP (configs/accelerate/ddp.yaml), "
                        f"not under {name}: each GPU holds the whole 4-bit model (~4 GB for 7B)")
    if name != "ddp" and cfg.model.device in ("cpu", "mps"):
        problems.append(f"model.device: {name} needs CUDA GPUs; on a CPU launch with torchrun (DDP over gloo)")
    if name == "fsdp" and _flag("FSDP_ACTIVATION_CHECKPOINTING") and cfg.train.gradient_checkpointing:
        problems.append("train.gradient_checkpointing: the accelerate config already checkpoints activations "
                        "(fsdp_activation_checkpointing); set it to false")
    return problems


def agree_on_run_dir(state: PartialState, prepare: Callable[[], Path]) -> Path:
    """Rank 0 prepares the run folder; every rank gets its path, or the same error.

    The folder name may come from the clock (runs/<date>-<time>), which differs between processes,
    and only one process may check, clear and create it.
    """
    outcome: list = [None]
    if state.is_main_process:
        try:
            outcome = [("ok", str(prepare()))]
        except MathtuneError as exc:
            outcome = [("error", str(exc))]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome, from_process=0)
    kind, text = outcome[0]
    if kind == "error":
        raise MathtuneError(text)
    return Path(text)


def leave_process_group(state: PartialState) -> None:
    """Every process meets here once training and the adapter are saved, then the process group is
    closed. Rank 0 goes on alone (summary, generation, report) while the others exit: a process that
    exits with its group still open can abort in gloo's teardown (seen as SIGABRT, "terminate called
    without an active exception"), and a rank waiting at a barrier through a long evaluation would
    hit the collective timeout."""
    import torch.distributed as dist

    if state.num_processes > 1 and dist.is_available() and dist.is_initialized():
        state.wait_for_everyone()
        dist.destroy_process_group()


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")
