"""What this computer's hardware supports, read from the hardware itself (not from CTFMLib), for the tests of
the precision policy (CTFMLib.runtime.resolve_precision)."""

import pytest
import torch


def expected_precision(device: str) -> str:
    """``auto``'s rule (bf16 on CUDA with bf16, on CPUs with AVX512-BF16 or AMX; else fp32), read from the hardware."""
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(next(ln for ln in f if ln.startswith("flags")).split())
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags to read the CPU's bf16 support from")
    return "bf16" if flags & {"avx512_bf16", "amx_bf16"} else "fp32"


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
