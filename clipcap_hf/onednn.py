"""fp32 linear layers through oneDNN for inference on the CPU.

Written by hand because the ecosystem lacks it: in eager mode PyTorch computes fp32 linear layers with MKL's GEMM,
and `torch.compile` (tried with `freezing`) was no faster. On the AMD EPYC this package is benchmarked on, MKL is
slow at the few rows a decoding step has, and oneDNN, which PyTorch also ships, computes the same products on the
same weights up to 2.8x faster (GPT-2 small's layers: 2.8x on 16 rows, 1.6x on 80; its LM head: 2.3x on 16 rows).
The results are fp32 products summed in another order, so they equal MKL's within float rounding.

Saved models carry this file with the modeling code (for `trust_remote_code`), so it needs nothing beyond torch.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


def onednn_linear_available() -> bool:
    """
    Whether this PyTorch has oneDNN's linear kernel, on an x86-64 processor (where it was measured), with
    `torch.backends.mkldnn.enabled`.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:  # private to the inductor backend, so looked up rather than assumed
        torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return False
    return True


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled()


def _is_plain_cpu_float(tensor: object) -> bool:
    # Plain tensors and parameters only: subclasses (DTensor, quantized weights, ...) keep their own kernels.
    return (
        type(tensor) in (torch.Tensor, nn.Parameter)
        and tensor.dtype == torch.float32
        and tensor.device.type == "cpu"
        and tensor.layout == torch.strided
    )


def _onednn_computes(inputs: object, weight: object, bias: object) -> bool:
    """Whether oneDNN's kernel computes `F.linear(inputs, weight, bias)` as is."""
    if not (_is_plain_cpu_float(inputs) and _is_plain_cpu_float(weight)) or weight.dim() != 2:
        return False
    if inputs.dim() == 0 or inputs.numel() == 0 or inputs.shape[-1] != weight.shape[1]:
        return False
    if bias is not None and not (
        _is_plain_cpu_float(bias) and bias.shape == weight.shape[:1] and bias.is_contiguous()  # read as a flat array
    ):
        return False
    # Row-major (nn.Linear) or column-major (GPT-2's Conv1D, transposed) weights: no copy needed.
    return weight.is_contiguous() or weight.T.is_contiguous()


def _onednn_linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = inputs.reshape(-1, inputs.shape[-1])
    outputs = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return outputs.view(*inputs.shape[:-1], weight.shape[0])


def _linear_operands(func, args: tuple) -> tuple | None:
    """`(inputs, weight, bias)` of a linear product oneDNN's kernel computes as is, or None for any other call."""
    if func is F.linear and len(args) in (2, 3):
        inputs, weight, bias = (*args, None)[:3]
    elif func is torch.addmm and len(args) == 3 and all(isinstance(a, torch.Tensor) and a.dim() == 2 for a in args[1:]):
        bias, inputs, weight = args[0], args[1], args[2].T  # GPT-2's Conv1D stores (in_features, out_features)
    else:
        return None
    if torch.is_grad_enabled() or _cpu_autocast_enabled() or not _onednn_computes(inputs, weight, bias):
        return None
    return inputs, weight, bias


class _OneDNNLinearMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        operands = None if kwargs else _linear_operands(func, args)
        if operands is not None:
            return _onednn_linear(*operands)
        return func(*args, **(kwargs or {}))


@contextmanager
def onednn_linear() -> Iterator[None]:
    """
    Within the block, `F.linear` and `torch.addmm(bias, inputs, weight)` calls on fp32 CPU tensors run through
    oneDNN's kernel when gradients are off and autocast is not on; every other call runs as usual, and so do calls
    made inside other functions (`nn.MultiheadAttention`'s projections, say). For inference only: not for forward-mode
    AD or `vmap`. `ClipCapForConditionalGeneration.generate()` runs within it for fp32 models on the CPU.

    Does nothing where `onednn_linear_available()` is False when the block starts; `torch.backends.mkldnn.enabled =
    False` turns it off:

    ```python
    torch.backends.mkldnn.enabled = False
    ids = model.generate(**inputs)  # MKL, PyTorch's default for fp32 linear layers
    ```
    """
    if not onednn_linear_available():
        yield
        return
    with _OneDNNLinearMode():
        yield


__all__ = ["onednn_linear", "onednn_linear_available"]
