"""fp32 linear layers through oneDNN, for inference on the CPU where measured faster.

Written by hand because the ecosystem lacks it: in eager mode PyTorch computes fp32 linear layers with MKL's GEMM,
and `torch.compile` (tried with `freezing`, which would prepack weights too) was no faster or failed. Which of MKL and
oneDNN (which PyTorch also ships) is faster at the few rows a decoding step has depends on the processor: on an AMD
EPYC oneDNN computed GPT-2 small's layers 2.5x faster than MKL at 16 rows (and a 2048-square product at 477 GFLOP/s
against MKL's 218), while on an Intel Sapphire Rapids it made greedy generation about 20% slower. So
`cpu_linear_kernels(model)`, which `generate()` runs in, picks the kernels by timing both on this machine at the
model's widths (`onednn_is_faster`, once per process and shape), and routes through oneDNN only where it is clearly
faster. The results are fp32 products summed in another order, so they equal MKL's within float rounding.

Prepacking (`onednn_linear(model, prepack=True)`): oneDNN reads a weight fastest in its own blocked layout, and reorders
a plain weight into it at every product; from packed weights GPT-2 small's layers took 11.1 ms at 16 rows instead of
17.7. Packing them costs 0.2 to 0.3 s and a copy of the weights, so it pays over many decoding steps (a captioning run
over many batches) and the packed copies live only as long as the block: weights can change between blocks (training,
merging adapters) without a packed copy going stale. `generate()` alone runs on plain weights.

Saved models carry this file with the modeling code (for `trust_remote_code`), so it needs nothing beyond torch,
transformers and the standard library.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


def onednn_linear_available() -> bool:
    """
    Whether this PyTorch has oneDNN's linear kernel, on an x86-64 processor (where it was measured), with
    `torch.backends.mkldnn.enabled`.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    return _has_mkldnn_op("_linear_pointwise")


def _has_mkldnn_op(name: str) -> bool:
    # Private to the inductor backend (its `freezing` path), so looked up rather than assumed; the default overload is
    # the one called.
    try:
        getattr(torch.ops.mkldnn, name).default
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
        and tensor.is_cpu
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


# Rows a packed layout is chosen for: packing for 16 rows ran products on 1 to 160 rows about as fast as packing for
# the rows used (measured on an AMD EPYC; packing for 1 row was up to 25% slower at 16 rows and more).
PACK_ROWS = 16


def _packed_weight(layer: nn.Linear | Conv1D, weight: torch.Tensor, packs: dict) -> torch.Tensor:
    """
    `weight` (the layer's, transposed for GPT-2's `Conv1D`) in oneDNN's blocked layout for `PACK_ROWS` rows, from
    `packs` (the block's) or packed now: again when the layer's weight is another tensor or was changed in place.
    """
    parameter = layer.weight
    # Inference tensors keep no version counter; they cannot be changed outside inference mode either.
    version = None if parameter.is_inference() else parameter._version
    state = (id(parameter), parameter.data_ptr(), version)
    cached = packs.get(layer)
    if cached is None or cached[0] != state:
        cached = packs[layer] = (state, torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS))
    return cached[1]


def _onednn_linear(
    inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None = None
) -> torch.Tensor:
    rows = inputs.reshape(-1, inputs.shape[-1])
    # The overload named: resolving it from the packet costs about 5 us of a decoding step's 49 calls each.
    outputs = torch.ops.mkldnn._linear_pointwise.default(
        rows, weight if packed is None else packed, bias, "none", [], ""
    )
    return outputs.view(*inputs.shape[:-1], weight.shape[0])


class _RoutedForward:
    """
    A linear layer's forward within an `onednn_linear` block: through oneDNN (on its packed weight with `packs`), or
    its class's forward where that does not apply. Closed when the block ends, it is the class's forward for good and
    drops the packed weights: a forward that outlives the block (kept by a shallow copy of the layer, or by a hook
    wrapped around it) neither routes nor computes from a stale packed weight. A deep copy or pickle of the layer made
    within the block gets a closed one, bound to the copy. The layer is held weakly: no reference cycle keeps a copy's
    weights alive.
    """

    __slots__ = ("_layer", "packs", "is_open")

    def __init__(self, layer: nn.Linear | Conv1D, packs: dict | None, is_open: bool = True):
        self._layer, self.packs, self.is_open = weakref.ref(layer), packs, is_open

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        layer = self._layer()
        weight = layer.weight.T if isinstance(layer, Conv1D) else layer.weight  # Conv1D stores (in, out)
        if (
            not self.is_open
            or torch.is_grad_enabled()
            or _cpu_autocast_enabled()
            # Inside a graph `torch.compile` traces, its backend picks the kernels.
            or torch.compiler.is_compiling()
            or not _onednn_computes(inputs, weight, layer.bias)
        ):
            return type(layer).forward(layer, inputs)
        packed = None if self.packs is None else _packed_weight(layer, weight, self.packs)
        return _onednn_linear(inputs, weight, layer.bias, packed)

    def close(self) -> None:
        self.is_open, self.packs = False, None

    def __reduce__(self):
        # `copy.deepcopy` and `pickle` alike: the copy's forward is closed, bound to the copied layer.
        return _closed_forward, (self._layer(),)


def _closed_forward(layer: nn.Linear | Conv1D) -> _RoutedForward:
    return _RoutedForward(layer, None, is_open=False)


def _forward_replaced(module: nn.Module) -> bool:
    """Whether `module.forward` is replaced on the instance (by accelerate's hooks, or an enclosing block)."""
    forward = module.__dict__.get("forward")
    # A closed routed forward (left by an ended block, or in a copy made within one) is the class's forward.
    return forward is not None and not (isinstance(forward, _RoutedForward) and not forward.is_open)


def _routable(module: nn.Module) -> bool:
    # Exactly these classes (subclasses and wrappers such as quantized or LoRA layers compute otherwise; a LoRA
    # layer's base layer and adapters are plain `nn.Linear`s and are routed themselves), with their weight a
    # parameter, and no forward replaced on the instance.
    return type(module) in (nn.Linear, Conv1D) and type(module.weight) is nn.Parameter and not _forward_replaced(module)


@contextmanager
def onednn_linear(model: nn.Module, prepack: bool = False) -> Iterator[None]:
    """
    Within the block, the `nn.Linear` and GPT-2 `Conv1D` layers of `model` compute through oneDNN when gradients are
    off, autocast is not on, and their input and weight are fp32 CPU tensors; otherwise, and for every other layer,
    they compute as usual. For inference only. Unconditional: `cpu_linear_kernels(model)` enters it only where oneDNN
    measured faster.

    With `prepack=True`, each layer's weight is packed into oneDNN's blocked layout on its first product in the block
    and the packed copy serves the block's later products (see the module's docstring): worth it over many decoding
    steps, such as a captioning run over many batches, and freed when the block ends. A weight replaced, or changed by
    PyTorch's in-place operations, is packed again; one changed through `.data` (as peft's `merge_adapter` does) is
    not seen, so merge or unmerge adapters outside the block.

    Each routed layer's `forward` is replaced on the instance for the block's duration (as accelerate's hooks do),
    so nothing else pays for it: a `TorchFunctionMode` seeing every operator cost about 3 ms per decoding step of
    GPT-2 small in Python. Does nothing where `onednn_linear_available()` is False when the block starts
    (`torch.backends.mkldnn.enabled = False` turns it off for blocks entered after). Blocks nest: an inner block
    leaves the layers to the outer.

    ```python
    layer = torch.nn.Linear(768, 768)
    with torch.no_grad(), onednn_linear(layer, prepack=True):
        out = layer(torch.randn(16, 768))
    ```
    """
    if not onednn_linear_available():
        yield
        return
    # A PyTorch with the linear kernel but not the reorder computes from plain weights.
    packs = {} if prepack and _has_mkldnn_op("_reorder_linear_weight") else None
    routed = {layer: _RoutedForward(layer, packs) for layer in model.modules() if _routable(layer)}
    with _forwards_replaced(routed):
        yield


@contextmanager
def _forwards_replaced(forwards: dict[nn.Module, _RoutedForward]) -> Iterator[None]:
    """Each module's `forward` replaced on the instance for the block; put back after, unless another was put there
    since (accelerate's hooks, or a block entered later), and closed either way."""
    for module, forward in forwards.items():
        module.forward = forward
    try:
        yield
    finally:
        for module, forward in forwards.items():
            forward.close()
            if module.__dict__.get("forward") is forward:
                del module.forward


CPU_LINEAR_ENV = "CLIPCAP_CPU_LINEAR"
CPU_LINEAR_CHOICES = ("auto", "onednn", "default")
# oneDNN is chosen only when MKL takes at least this many times as long: a clear margin over timing noise, since a
# wrong choice of oneDNN makes generation slower than plain PyTorch, and a wrong choice of MKL is plain PyTorch.
ONEDNN_MARGIN = 1.1
# Timed repetitions of each kernel (after one untimed call of each): as many as fit in about this many seconds,
# within the bounds below. The minimum over them is what counts: a busy shared core only ever adds time.
_MEASURE_BUDGET_S = 0.04
_MIN_REPEATS, _MAX_REPEATS = 3, 25


def _random_weight(out_features: int, in_features: int) -> torch.Tensor:
    # A random block tiled over the weight: filling all of it with random numbers would take longer than timing it
    # (about 0.25 s for GPT-2's LM head), and the kernels' speed does not depend on the values.
    numel = out_features * in_features
    block = torch.rand(min(numel, 1 << 16), generator=torch.Generator().manual_seed(0)) - 0.5
    return block.repeat(math.ceil(numel / block.numel()))[:numel].view(out_features, in_features)


@torch.no_grad()
def _time_linear_kernels(in_features: int, out_features: int, rows: int) -> tuple[float, float]:
    """
    The fastest of a few timed runs of `F.linear` (PyTorch's default kernel, MKL) and of oneDNN's kernel, in seconds,
    on a `(rows, in_features)` input and a random `(out_features, in_features)` weight and bias. The two alternate,
    each first in turn, so that a busy spell or a warm cache favours neither.
    """
    weight = _random_weight(out_features, in_features)
    # A generator of its own: drawing from torch's global one would change the user's seeded sampling after the
    # first `generate` of a process.
    generator = torch.Generator().manual_seed(0)
    bias = torch.rand(out_features, generator=generator) - 0.5
    inputs = torch.rand(rows, in_features, generator=generator) - 0.5
    kernels = (lambda: F.linear(inputs, weight, bias), lambda: _onednn_linear(inputs, weight, bias))
    start = time.perf_counter()
    for kernel in kernels:  # untimed: oneDNN builds its primitive on a first call, and the weight comes into cache
        kernel()
    one_each_s = time.perf_counter() - start
    repeats = min(max(int(_MEASURE_BUDGET_S / max(one_each_s, 1e-9)), _MIN_REPEATS), _MAX_REPEATS)
    best = [math.inf, math.inf]
    for repeat in range(repeats):
        for index in (0, 1) if repeat % 2 == 0 else (1, 0):
            start = time.perf_counter()
            kernels[index]()
            best[index] = min(best[index], time.perf_counter() - start)
    return best[0], best[1]


@functools.lru_cache(maxsize=None)
def _cached_linear_kernel_times(in_features: int, out_features: int, rows: int, threads: int) -> tuple[float, float]:
    del threads  # part of the cache key only: the times depend on it
    return _time_linear_kernels(in_features, out_features, rows)


def linear_kernel_times(in_features: int, out_features: int, rows: int = 16) -> tuple[float, float] | None:
    """
    `(mkl_s, onednn_s)`: the fastest of a few runs of PyTorch's default fp32 linear kernel (MKL) and of oneDNN's, in
    seconds, for a linear layer of this shape applied to `rows` rows, measured on this machine at PyTorch's current
    thread count once per process (cached; under 0.3 s for GPT-2's LM head). None where `onednn_linear_available()`
    is False, without measuring.
    """
    if not onednn_linear_available():
        return None
    return _cached_linear_kernel_times(in_features, out_features, rows, torch.get_num_threads())


def onednn_is_faster(in_features: int, out_features: int, rows: int = 16) -> bool:
    """
    Whether oneDNN's kernel computes an fp32 linear layer of this shape on `rows` rows clearly faster (by
    `ONEDNN_MARGIN`) than PyTorch's default on this machine, by `linear_kernel_times` (measured once, cached). False
    where oneDNN's kernel is unavailable (not x86-64, a PyTorch without it, `torch.backends.mkldnn.enabled = False`).
    """
    times = linear_kernel_times(in_features, out_features, rows)
    return times is not None and times[0] >= ONEDNN_MARGIN * times[1]


def _requested_cpu_linear() -> str:
    requested = os.environ.get(CPU_LINEAR_ENV, "auto").strip().lower() or "auto"
    if requested not in CPU_LINEAR_CHOICES:
        raise ValueError(f"{CPU_LINEAR_ENV}={requested!r}: expected one of {', '.join(CPU_LINEAR_CHOICES)}.")
    return requested


def cpu_linear_choice(model: nn.Module, rows: int = 16) -> str:
    """
    The kernels `cpu_linear_kernels(model)` runs the model's fp32 linear layers with: `"onednn"` or `"default"`
    (PyTorch's own, MKL). `"default"` unless the model is in fp32 on the CPU and oneDNN's kernel is available; then
    the environment variable `CLIPCAP_CPU_LINEAR` decides:

    - `auto` (or unset): measured on this machine (`linear_kernel_times`, once per process) at the widths of the
      model's language model, read from its input embeddings (`vocab_size`, `hidden`): its MLP's widening layer
      (`hidden` -> `4 * hidden`) and its LM head (`hidden` -> `vocab_size`) on `rows` rows, a decoding step of 16
      sequences. `"onednn"` when the two take clearly less time (`ONEDNN_MARGIN`) summed through oneDNN than through
      MKL.
    - `onednn`: oneDNN, without measuring.
    - `default`: PyTorch's default, without measuring.

    Anything else raises a ValueError.
    """
    requested = _requested_cpu_linear()
    if model.device.type != "cpu" or model.dtype != torch.float32 or not onednn_linear_available():
        return "default"
    if requested != "auto":
        return requested
    embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return "default"
    vocab_size, hidden = weight.shape
    times = [linear_kernel_times(hidden, out_features, rows) for out_features in (4 * hidden, vocab_size)]
    if any(pair is None for pair in times):
        return "default"
    mkl_s, onednn_s = (sum(pair[index] for pair in times) for index in (0, 1))
    return "onednn" if mkl_s >= ONEDNN_MARGIN * onednn_s else "default"


def cpu_linear_kernels(model: nn.Module, prepack: bool = False) -> contextlib.AbstractContextManager[None]:
    """
    A context manager for inference with `model` (a transformers model): `onednn_linear(model, prepack=prepack)` where
    `cpu_linear_choice(model)` is `"onednn"` (an fp32 model on the CPU, on a machine where oneDNN measured clearly
    faster at the model's widths, or `CLIPCAP_CPU_LINEAR=onednn`), else a context that changes nothing.
    `ClipCapForConditionalGeneration.generate()` runs within it. The choice is made when it is called; the first call
    in a process at a model's widths times the kernels (well under a second).

    Hold one block with `prepack=True` over many `generate()` calls with unchanged weights (a captioning run): each
    weight is packed for oneDNN once, on its first use, and `generate()`'s own block leaves the layers to it.
    """
    if cpu_linear_choice(model) == "onednn":
        return onednn_linear(model, prepack=prepack)
    return contextlib.nullcontext()


__all__ = [
    "CPU_LINEAR_ENV",
    "cpu_linear_choice",
    "cpu_linear_kernels",
    "linear_kernel_times",
    "onednn_is_faster",
    "onednn_linear",
    "onednn_linear_available",
]
