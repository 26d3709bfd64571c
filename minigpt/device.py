"""Where and in what precision to run: device and precision resolution, autocast, CPU features,
accelerator peak FLOPs (for MFU) and the allocator setting the training commands use."""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

from .errors import ConfigError

__all__ = ["PRECISIONS", "process_rank", "resolve_device", "cpu_has_native_bf16", "resolve_precision", "autocast",
           "peak_flops", "reuse_freed_memory"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def process_rank() -> int:
    """This process's rank under torchrun (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available, else cpu; otherwise a torch device name (cpu, cuda, cuda:N, mps)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown --device {name!r} (auto, cpu, cuda or cuda:N)") from None


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matrix instructions (AVX512-BF16 or AMX), where bf16 autocast is a
    clear speed-up; elsewhere it is emulated and slower than fp32. False too when torch's kernels
    are capped below AVX-512 (ATEN_CPU_CAPABILITY=avx2, as on an AVX2-only CPU)."""
    try:
        native = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch
        return False
    return native and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 on CUDA (fp16 where bf16 is missing), bf16 on CPUs with native bf16, else fp32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs CUDA; on CPU use --precision bf16 or fp32")
    return precision


def autocast(precision: str, device: torch.device):
    """The autocast context of a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def peak_flops(device: torch.device) -> Optional[float]:
    """Dense bf16 peak of known accelerators (for MFU); None when unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12),
                       ("4090", 165e12), ("A10", 125e12)):
        if key in name:
            return flops
    return None


def reuse_freed_memory() -> bool:
    """Ask glibc malloc to keep freed memory for reuse instead of returning it to the OS.

    A CPU training step allocates and frees hundreds of MB of large tensors (logits chunks,
    embedding gradients); by default each is a fresh mmap, and touching its pages costs ~0.4M page
    faults per step, a third of a small model's step time. Called by the training commands (a
    process-wide setting, so never implicitly by the library). Returns whether it took effect.
    """
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc
        return False
