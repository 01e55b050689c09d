"""Helpers the benchmark scripts share: the machine's name and measured rates, wall-clock timing, and the paper's
language model."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch


def cpu_name() -> str:
    """The processor's model name (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def use_seven_operation_gelu_new(language_model: torch.nn.Module) -> None:
    """
    Put transformers' `gelu_new` (`NewGELUActivation`, seven elementwise operations) back in `language_model`, in
    place of the fused tanh-GELU that ClipCap models compute it with: GPT-2 as transformers builds it and the paper's
    code ran it, for the reference loops.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    from clipcap_hf.modeling_clipcap import replace_modules

    replace_modules(language_model, GELUTanh, NewGELUActivation)


def call_seconds(function: Callable[[], object]) -> float:
    """Wall-clock seconds one call of `function()` takes."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _square_product_rate(product: Callable[[torch.Tensor, torch.Tensor], object], size: int, repeats: int) -> float:
    """fp32 FLOP per second of `product(a, b)` on two random square matrices, best of a few runs after a warm-up."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    product(a, b)
    return 2 * size**3 / min(call_seconds(lambda: product(a, b)) for _ in range(repeats))


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """fp32 FLOP per second of a square `torch.mm` on the CPU, best of a few runs after a warm-up."""
    return _square_product_rate(torch.mm, size, repeats)


def onednn_matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """
    fp32 FLOP per second of the same product through oneDNN's kernel (0.0 where this PyTorch lacks it). On AMD
    processors it is about twice `torch.mm`'s (MKL's), so a floor computed from `torch.mm` alone would be too low a
    bar there.
    """
    from clipcap_hf.onednn import onednn_linear_available

    if not onednn_linear_available():
        return 0.0
    return _square_product_rate(
        lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""), size, repeats
    )


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second a sum over a large fp32 tensor reads, best of a few runs after a warm-up."""
    values = torch.ones(megabytes * 2**20 // 4)
    values.sum()
    return values.numel() * 4 / min(call_seconds(values.sum) for _ in range(repeats))


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a timer around it measures it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
