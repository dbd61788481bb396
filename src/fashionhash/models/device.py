"""Where the networks run: ``train.device`` (``auto`` | ``cpu`` | ``cuda``) -> a torch device."""
from __future__ import annotations

import torch
from torch import nn

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str, processes: int = 1) -> torch.device:
    """The device of one of ``processes`` training (or encoding) processes.

    ``auto`` takes a CUDA GPU when torch sees one and the job is one process. Several
    processes on GPUs (one per GPU, nccl) are refused: that path was never run on such a
    machine, so it is not shipped untested."""
    if name not in DEVICES:
        raise ValueError(f"train.device is one of {', '.join(DEVICES)}, not {name!r}")
    gpu = torch.cuda.is_available()
    if name == "cuda" and not gpu:
        raise ValueError("train.device=cuda but torch sees no CUDA GPU here (use train.device=cpu or auto)")
    if name == "cuda" and processes > 1:
        raise ValueError("train.device=cuda with several processes is not supported yet: train on "
                         "one GPU, or on CPUs with train.device=cpu")
    use_gpu = name == "cuda" or (name == "auto" and gpu and processes == 1)
    return torch.device("cuda" if use_gpu else "cpu")


def device_of(module: nn.Module) -> torch.device:
    """Where ``module``'s first parameter (or buffer) lives; the CPU when it has none."""
    return next(iter([*module.parameters(), *module.buffers()]), torch.empty(0)).device
