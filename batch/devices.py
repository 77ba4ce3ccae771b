"""CUDA calls that name the run's device.

torch.cuda's memory statistics, `synchronize` and `empty_cache` act on the *current* device
when none is given, which is GPU 0 unless someone set another: with `--device cuda:1` a run
would read GPU 0's (empty) statistics and sync the wrong GPU. Every CUDA call of the package
goes through here, with the device; on the CPU each is a no-op or None.
"""
from __future__ import annotations

import gc


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def activate(device: str) -> None:
    """Make `device` the current CUDA device, so the CUDA context and any allocation that names
    no device land on it rather than on GPU 0."""
    if is_cuda(device):
        import torch

        torch.cuda.set_device(device)


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a CPU-GPU sync point: only at stage boundaries, for honest timings)."""
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def reset_peak(device: str) -> None:
    if is_cuda(device):
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def peak_allocated(device: str) -> int | None:
    """torch's peak allocation on the device since the last `reset_peak` (None on the CPU)."""
    if not is_cuda(device):
        return None
    import torch

    return torch.cuda.max_memory_allocated(device)


def allocated(device: str) -> int | None:
    if not is_cuda(device):
        return None
    import torch

    return torch.cuda.memory_allocated(device)


def used_bytes(device: str) -> int | None:
    """Memory in use on the whole device, by every process (what nvidia-smi shows)."""
    if not is_cuda(device):
        return None
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return total - free


def free_cache(device: str) -> None:
    """Return unreferenced memory to the device: collect garbage first (cycles may hold tensors),
    then empty the caching allocator of this device."""
    gc.collect()
    if is_cuda(device):
        import torch

        with torch.cuda.device(device):
            torch.cuda.empty_cache()


def name(device: str) -> str | None:
    if not is_cuda(device):
        return None
    import torch

    return torch.cuda.get_device_name(device)


def total_bytes(device: str) -> int | None:
    if not is_cuda(device):
        return None
    import torch

    return torch.cuda.get_device_properties(device).total_memory
