"""fp32 linear layers through oneDNN, for inference on the CPU where measured faster.

Written by hand because the ecosystem lacks it: in eager mode PyTorch computes fp32 linear layers with MKL's GEMM,
and `torch.compile` (tried with `freezing`, which would prepack weights too) was no faster or failed. Which of MKL and
oneDNN (which PyTorch also ships) is faster depends on the processor and on the call: on an AMD EPYC oneDNN computed
GPT-2 small's layers 2.5x faster than MKL at 16 rows, yet on GPT-2's transposed `Conv1D` weights at 80 rows (a 5-beam
step) it was 10% to 50% slower while still faster on the LM head; on an Intel Sapphire Rapids it made greedy
generation about 20% slower. So `cpu_linear_kernels(model)`, which `generate()` runs in, measures rather than guesses:
each kind of call (weight shape and layout, rows, packed or not) runs its first few calls alternately on both kernels,
timed, and keeps the faster for the rest of the process (`_KernelRace`); oneDNN only where clearly faster. The results
are fp32 products summed in another order, so they equal MKL's within float rounding.

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
import os
import platform
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.nn.modules import module as module_hooks
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers.activations import GELUTanh
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
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
    if inputs.dim() == 0 or inputs.numel() == 0 or weight.numel() == 0 or inputs.shape[-1] != weight.shape[1]:
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


def _weight_state(parameter: torch.Tensor) -> tuple[int, int, int]:
    return id(parameter), parameter.data_ptr(), parameter._version


def _current_pack(layer: nn.Linear | Conv1D, packs: dict | None, state: tuple | None) -> torch.Tensor | None:
    """The layer's packed weight in `packs`, if packed from its weight as it is now (`state`, of the weight that the
    call read: not another tensor, nor changed in place since by its version counter; fused optimizer steps, which
    leave that as it is, clear the block's `packs`: `_routed`)."""
    cached = None if packs is None else packs.get(layer)
    return cached[1] if cached is not None and cached[0] == state else None


def _packed_weight(layer: nn.Linear | Conv1D, weight: torch.Tensor, packs: dict, state: tuple) -> torch.Tensor:
    """`weight` (the layer's as the call read it, transposed for GPT-2's `Conv1D`; `state` its [`_weight_state`]) in
    oneDNN's blocked layout for `PACK_ROWS` rows: the current copy in `packs` (the block's), or packed now."""
    packed = _current_pack(layer, packs, state)
    if packed is None:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)
        packs[layer] = (state, packed)
    return packed


def _onednn_linear(
    inputs: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: torch.Tensor | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    """`F.linear(inputs, weight, bias)` through oneDNN (from `packed`, its blocked copy, if given); with `gelu`, then
    tanh-GELU, applied by oneDNN as it writes the product (a post-op)."""
    rows = inputs.reshape(-1, inputs.shape[-1])
    # The overload named: resolving it from the packet costs about 5 us of a decoding step's 49 calls each.
    outputs = torch.ops.mkldnn._linear_pointwise.default(
        rows, weight if packed is None else packed, bias, *(("gelu", [], "tanh") if gelu else ("none", [], ""))
    )
    return outputs.view(*inputs.shape[:-1], weight.shape[0])


def _class_forward(layer: nn.Linear | Conv1D, inputs: torch.Tensor, gelu: bool) -> torch.Tensor:
    """The layer's forward as its class computes it (MKL on the CPU); with `gelu`, then tanh-GELU."""
    outputs = type(layer).forward(layer, inputs)
    return F.gelu(outputs, approximate="tanh") if gelu else outputs


def _onednn_forward(
    layer: nn.Linear | Conv1D,
    weight: torch.Tensor,
    inputs: torch.Tensor,
    packs: dict | None,
    state: tuple | None,
    gelu: bool,
) -> torch.Tensor:
    """The layer's forward through oneDNN: on its weight packed in `packs`, or on its plain weight without."""
    packed = None if packs is None else _packed_weight(layer, weight, packs, state)
    return _onednn_linear(inputs, weight, layer.bias, packed, gelu)


class _BlockForward:
    """
    A module's forward while a block routes it, replaced on the instance. Closed when the block ends, it is the
    class's forward, until a later block on the module reopens it: each module has one (`_opened_forward`), so
    whatever kept it past a block (a shallow copy of the module, a hook wrapped around it) routes again in the next,
    and never computes from a stale packed weight (`_packed_weight` checks the weight). Two threads that enter blocks
    on one module at the same moment share it, and the first to end leaves the other's calls to the class's forward:
    slower, not wrong. A deep copy or pickle of the module made within the block gets a closed one, bound to the copy.
    The module is held weakly: no reference cycle keeps a copy's weights alive.
    """

    __slots__ = ("_module", "is_open")

    def __init__(self, module: nn.Module):
        self._module, self.is_open = weakref.ref(module), False

    def open(self) -> None:
        self.is_open = True

    def close(self) -> None:
        self.is_open = False

    def __reduce__(self):
        # `copy.deepcopy` and `pickle` alike: the copy's forward is closed, bound to the copied module.
        return type(self), (self._module(),)


class _RoutedForward(_BlockForward):
    """
    A linear layer's forward within an `onednn_linear` or `cpu_linear_kernels` block: through oneDNN (on its packed
    weight with `packs`), or with `measure` through whichever kernel measured faster for the call's kind
    (`_KernelRace`), or its class's forward where oneDNN does not apply. Closing it drops the packed weights.
    """

    __slots__ = ("packs", "measure")

    def __init__(self, layer: nn.Linear | Conv1D):
        super().__init__(layer)
        self.packs, self.measure = None, False

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        layer = self._module()
        if kwargs or len(args) != 1:  # `layer(input=x)`: as the class computes it
            return type(layer).forward(layer, *args, **kwargs)
        return self.compute(layer, args[0])

    def compute(self, layer: nn.Linear | Conv1D, inputs: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        """The layer's forward on `inputs`; with `gelu`, followed by tanh-GELU (`_FusedMLPForward`)."""
        # Read once: a packed copy is made from, and recorded as, the very weight the call computes with, even if
        # another thread replaces the layer's weight meanwhile.
        parameter = layer.weight
        weight = parameter.T if isinstance(layer, Conv1D) else parameter  # Conv1D stores (in, out)
        if (
            not self.is_open
            or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu")
            # Inside a graph `torch.compile` traces, its backend picks the kernels.
            or torch.compiler.is_compiling()
            # Forward-mode AD (`torch.func.jvp`, dual tensors): oneDNN's kernel has no tangent formula.
            or forward_ad._current_level >= 0
            or not _onednn_computes(inputs, weight, layer.bias)
        ):
            return _class_forward(layer, inputs, gelu)
        # An inference tensor has no version counter, and can be changed in place in inference mode unseen: computed
        # from its plain weight, never from a packed copy that could be stale.
        packs = None if self.packs is None or parameter.is_inference() else self.packs
        state = None if packs is None else _weight_state(parameter)
        if not self.measure:
            return _onednn_forward(layer, weight, inputs, packs, state, gelu)
        kind = _call_kind(inputs, weight, layer.bias, packed=packs is not None, gelu=gelu)
        race = _KERNEL_RACES.get(kind)
        if race is None:
            race = _KERNEL_RACES[kind] = _KernelRace()
        if race.onednn is not None:
            if race.onednn:
                return _onednn_forward(layer, weight, inputs, packs, state, gelu)
            return _class_forward(layer, inputs, gelu)
        onednn = race.next_is_onednn()
        packed = _current_pack(layer, packs, state) if onednn else None
        if onednn and packs is not None and packed is None and layer not in race.packed_layers:
            # In a prepacking block the kind's later calls read packed weights, so oneDNN's turns are timed on packed
            # weights too: a turn on a layer not packed yet computes from the plain weight, packs it and counts for
            # nothing. Timed on plain weights, oneDNN measured 1.2x to 1.5x MKL's speed where packed it runs at 1.4x
            # to 2.3x (a prefill's 160 rows and a greedy step's 16, on an AMD EPYC), and `ONEDNN_MARGIN` settled
            # such kinds on MKL by chance. The packing stays out of every time: counted, it settled a prefill on MKL
            # for a whole captioning run where oneDNN computed it 1.3x faster. Once per layer and race: where every
            # block packs anew (one `generate()` per block), later turns are timed on the plain weight, so the race
            # still ends.
            outputs = _onednn_linear(inputs, weight, layer.bias, gelu=gelu)
            packed = _packed_weight(layer, weight, packs, state)
            if not race.packed_layers:
                # oneDNN builds its kernel for a weight layout on the first product in it (about 4x a product's time
                # at 16 rows): built here, once per kind, so that no timed turn pays for it.
                _onednn_linear(inputs, weight, layer.bias, packed, gelu=gelu)
            race.packed_layers.add(layer)
            return outputs
        start = time.perf_counter()
        if onednn:
            outputs = _onednn_linear(inputs, weight, layer.bias, packed, gelu=gelu)
        else:
            outputs = _class_forward(layer, inputs, gelu)
        race.record(onednn, time.perf_counter() - start)
        if onednn and packs is not None and packed is None:
            _packed_weight(layer, weight, packs, state)  # untimed, for the block's later calls
        return outputs

    def open(self, packs: dict | None = None, measure: bool = False) -> None:
        self.packs, self.measure, self.is_open = packs, measure, True

    def close(self) -> None:
        self.is_open, self.packs = False, None


def _is_tanh_gelu(activation: nn.Module) -> bool:
    """Whether `activation` is transformers' `GELUTanh` computing `F.gelu(x, approximate="tanh")` (ClipCap models'
    GPT-2 activation, `_fuse_gelu_new`), not its Python formula, and its forward not replaced."""
    function = getattr(activation, "act", None)
    return (
        type(activation) is GELUTanh
        and "forward" not in vars(activation)
        and isinstance(function, functools.partial)
        and function.func is F.gelu
        and not function.args
        and function.keywords == {"approximate": "tanh"}
    )


def _has_forward_hooks(*modules: nn.Module) -> bool:
    """Whether calling these modules would run forward hooks (their own, or global ones)."""
    return bool(module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks) or any(
        module._forward_hooks or module._forward_pre_hooks for module in modules
    )


class _FusedMLPForward(_BlockForward):
    """
    GPT-2's MLP (`c_fc`, tanh-GELU, `c_proj`) within a block that routes its `c_fc`: the GELU is applied by `c_fc`'s
    kernel as it writes the product (oneDNN's post-op; after MKL's product where that kernel is kept), instead of in a
    pass of its own over the activations. Such a pass took about 1.2 ms of a 38 ms greedy step of GPT-2 small at 16
    rows, a tenth of the step's time outside its products, on an AMD EPYC; the results equal within float rounding.
    Computed as the class computes it wherever fusing would skip something: hooks on `c_fc` or the activation (they
    would not run, or see the activated outputs), another activation, gradients, a graph `torch.compile` traces.
    """

    __slots__ = ()

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        mlp = self._module()
        linear = vars(mlp.c_fc).get("forward")
        if (
            kwargs
            or len(args) != 1
            or not self.is_open
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or not (isinstance(linear, _RoutedForward) and linear.is_open)
            or not _is_tanh_gelu(mlp.act)
            or _has_forward_hooks(mlp.c_fc, mlp.act)
        ):
            return type(mlp).forward(mlp, *args, **kwargs)
        return mlp.dropout(mlp.c_proj(linear.compute(mlp.c_fc, args[0], gelu=True)))


# Each routed module's forward, reopened by every block that routes the module: `torch.compile` guards on the
# identity of a module's forward, so a new one per block (per `generate()` call) would trace a compiled decoding step
# again in every call, until dynamo gives up and runs it eagerly. Weak keys: a module's forward goes with it.
_FORWARDS: weakref.WeakKeyDictionary[nn.Module, _BlockForward] = weakref.WeakKeyDictionary()


def _opened_forward(module: nn.Module, forward_class: type[_BlockForward], **settings: Any) -> _BlockForward:
    """The module's forward of `forward_class`, opened for a block with `settings`."""
    forward = _FORWARDS.get(module)
    if forward is None:
        forward = _FORWARDS[module] = forward_class(module)
    forward.open(**settings)
    return forward


def _forward_replaced(module: nn.Module) -> bool:
    """Whether `module.forward` is replaced on the instance (by accelerate's hooks, or an enclosing block)."""
    forward = module.__dict__.get("forward")
    # A closed block's forward (left by an ended block, or in a copy made within one) is the class's forward.
    return forward is not None and not (isinstance(forward, _BlockForward) and not forward.is_open)


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
    they compute as usual. For inference only. Unconditional: `cpu_linear_kernels(model)` routes each kind of call
    where oneDNN measured faster.

    With `prepack=True`, each layer's weight is packed into oneDNN's blocked layout on its first product in the block
    and the packed copy serves the block's later products (see the module's docstring): worth it over many decoding
    steps, such as a captioning run over many batches, and freed when the block ends. A weight replaced, changed by
    PyTorch's in-place operations or by an optimizer step, is packed again; one changed through `.data` (as peft's
    `merge_adapter` does) is not seen, so merge or unmerge adapters outside the block. Inference tensors (weights made
    in `torch.inference_mode`), whose in-place changes leave no trace, are never packed.

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
    with _routed(model, prepack=prepack, measure=False):
        yield


@contextmanager
def _routed(model: nn.Module, prepack: bool, measure: bool) -> Iterator[None]:
    """`onednn_linear(model, prepack)`, or with `measure` each kind of call on the kernel measured faster for it."""
    if not onednn_linear_available():
        yield
        return
    # A PyTorch with the linear kernel but not the reorder computes from plain weights.
    packs = {} if prepack and _has_mkldnn_op("_reorder_linear_weight") else None
    routed: dict[nn.Module, _BlockForward] = {
        layer: _opened_forward(layer, _RoutedForward, packs=packs, measure=measure)
        for layer in model.modules() if _routable(layer)
    }
    # GPT-2's MLPs whose first layer is routed here compute their activation in that layer's kernel.
    fused = [
        module for module in model.modules()
        if type(module) is GPT2MLP and module.c_fc in routed and not _forward_replaced(module)
    ]
    routed.update((mlp, _opened_forward(mlp, _FusedMLPForward)) for mlp in fused)
    with _forwards_replaced(routed), _packs_cleared_by_optimizer_steps(packs):
        yield


# The packed copies of the prepacking blocks open in this process, which every optimizer step clears. One hook for
# them all, registered with the first block and kept: registering and removing one per block would change PyTorch's
# global hook dict while another thread's optimizer step iterates over it.
_OPEN_PACKS: dict[int, dict] = {}  # by id: the dicts themselves compare by content
_OPEN_PACKS_LOCK = threading.Lock()
_optimizer_hook_registered = False


def _clear_open_packs(optimizer, args, kwargs) -> None:
    with _OPEN_PACKS_LOCK:
        open_packs = list(_OPEN_PACKS.values())
    for packs in open_packs:
        packs.clear()


@contextmanager
def _packs_cleared_by_optimizer_steps(packs: dict | None) -> Iterator[None]:
    """
    Within the block, every optimizer step clears `packs`: PyTorch's fused optimizers (the Trainer's default AdamW)
    change the weights in place without counting a version, which `_packed_weight` would not see.
    """
    global _optimizer_hook_registered
    if packs is None:
        yield
        return
    with _OPEN_PACKS_LOCK:
        if not _optimizer_hook_registered:
            register_optimizer_step_post_hook(_clear_open_packs)
            _optimizer_hook_registered = True
        _OPEN_PACKS[id(packs)] = packs
    try:
        yield
    finally:
        with _OPEN_PACKS_LOCK:
            del _OPEN_PACKS[id(packs)]


@contextmanager
def _forwards_replaced(forwards: dict[nn.Module, _BlockForward]) -> Iterator[None]:
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
CPU_LINEAR_MODES = ("auto", "onednn", "default")
# oneDNN is chosen only when MKL takes at least this many times as long: a clear margin over timing noise, since a
# wrong choice of oneDNN makes generation slower than plain PyTorch, and a wrong choice of MKL is plain PyTorch. At 1.1,
# kinds whose first calls measured oneDNN 11% to 21% faster on an Intel Xeon ran a whole 5-beam search 3% to 5% slower
# than MKL alone; the gains worth having were larger (1.3x on the LM head and 2.5x on GPT-2's layers at 16 rows on an
# AMD EPYC, 1.8x on the MLP mapper at 16 rows on that Intel Xeon).
ONEDNN_MARGIN = 1.25
# Timed calls of each kernel per kind of call, after an untimed first call of each (oneDNN builds its primitive then).
# The fewest seconds of each count: a busy shared core only ever adds time.
TIMED_CALLS = 3


class _KernelRace:
    """
    Which of MKL and oneDNN computes one kind of linear call (`_call_kind`) faster on this machine, found on the calls
    themselves: the kind's first calls alternate between the two kernels, timed (after an untimed first call each).
    As soon as oneDNN's fewest seconds are no fewer than MKL's, the kind keeps MKL for the rest of the process;
    otherwise, once each kernel has run `1 + TIMED_CALLS` times, it keeps oneDNN if MKL's fewest are at least
    `ONEDNN_MARGIN` times oneDNN's, and MKL if not. Measuring costs a few calls on the slower kernel, on kinds called
    once per `generate()` (a prefill, the mapper) too. In a block with `prepack=True` the turns time oneDNN on packed
    weights (a turn on a layer not packed yet packs it and is not counted, once per layer; after that, such a turn is
    timed on the plain weight), and the packed copies of the layers its oneDNN turns ran are held until the block
    ends, whichever kernel the kind keeps.
    """

    __slots__ = ("seconds", "onednn", "packed_layers")

    def __init__(self) -> None:
        self.seconds: tuple[list[float], list[float]] = ([], [])  # MKL's calls, oneDNN's
        self.onednn: bool | None = None  # None while measuring
        # The layers an uncounted turn of this race packed (in any block): each has one such turn.
        self.packed_layers: weakref.WeakSet[nn.Module] = weakref.WeakSet()

    def next_is_onednn(self) -> bool:
        mkl, onednn = self.seconds
        return len(onednn) < len(mkl)

    def record(self, onednn: bool, seconds: float) -> None:
        if self.onednn is not None:
            return
        self.seconds[onednn].append(seconds)
        mkl_s, onednn_s = self.fewest_seconds()
        if mkl_s is not None and onednn_s is not None and mkl_s <= onednn_s:
            # oneDNN is not faster at all: MKL from here on, without running the slower kernel again.
            self.onednn = False
        elif min(len(calls) for calls in self.seconds) > TIMED_CALLS:
            # Faster, but kept only if clearly: decided on the fewest of every timed call, since one call slowed by a
            # busy spell decided kinds near the margin either way.
            self.onednn = mkl_s >= ONEDNN_MARGIN * onednn_s

    def fewest_seconds(self) -> tuple[float | None, float | None]:
        """MKL's and oneDNN's fewest seconds over their timed calls (a first call is untimed); None before one."""
        mkl_s, onednn_s = (min(calls[1:]) if len(calls) > 1 else None for calls in self.seconds)
        return mkl_s, onednn_s


# Every kind of call measured in this process (by `cpu_linear_kernels` blocks), and its race.
_KERNEL_RACES: dict[tuple, _KernelRace] = {}


def _call_kind(
    inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: bool, gelu: bool = False
) -> tuple:
    """
    What the kernels' speed depends on: the weight's shape and layout (GPT-2's `Conv1D` weights are read transposed:
    oneDNN was slower than MKL on them at 80 rows on an AMD EPYC, and faster on the row-major LM head), the bias,
    packed weights or plain, a GELU after the product (`_FusedMLPForward`), the thread count, and the rows rounded up
    to a power of two (a greedy step of 16 images, a 5-beam step's 80 rows and a prefill's 800 are different kinds).
    """
    rows = inputs.numel() // inputs.shape[-1]
    return (
        *weight.shape, weight.is_contiguous(), bias is not None, packed, gelu, (rows - 1).bit_length(),
        torch.get_num_threads(),
    )


def cpu_linear_choices() -> list[dict[str, object]]:
    """
    Each kind of linear call measured in this process so far (by `cpu_linear_kernels` blocks), with its kernel
    (`"onednn"`, `"default"`, or None while still measuring) and the fewest milliseconds each kernel took on it (None
    before a timed call): what the blocks route, for reports such as the benchmarks'. `"activation"` is `"gelu_tanh"`
    for GPT-2's first MLP layers, whose timed calls include the activation, else None.
    """
    choices = []
    # A copy: blocks in other threads may add kinds meanwhile.
    for kind, race in list(_KERNEL_RACES.items()):
        out_features, in_features, row_major, bias, packed, gelu, rows_bits, threads = kind
        mkl_ms, onednn_ms = (None if seconds is None else round(seconds * 1e3, 3) for seconds in race.fewest_seconds())
        choices.append({
            "in_features": in_features, "out_features": out_features,
            "weight": "row-major" if row_major else "transposed", "bias": bias, "packed": packed,
            "activation": "gelu_tanh" if gelu else None, "rows_up_to": 1 << rows_bits, "threads": threads,
            "kernel": None if race.onednn is None else "onednn" if race.onednn else "default",
            "mkl_ms": mkl_ms, "onednn_ms": onednn_ms,
        })
    return choices


def _requested_cpu_linear() -> str:
    requested = os.environ.get(CPU_LINEAR_ENV, "auto").strip().lower() or "auto"
    if requested not in CPU_LINEAR_MODES:
        raise ValueError(f"{CPU_LINEAR_ENV}={requested!r}: expected one of {', '.join(CPU_LINEAR_MODES)}.")
    return requested


def cpu_linear_mode(model: nn.Module) -> str:
    """
    How `cpu_linear_kernels(model)` runs the model's fp32 linear layers: `"default"` (PyTorch's own kernels, MKL;
    nothing routed) unless the model is in fp32 on the CPU and oneDNN's kernel is available; then the environment
    variable `CLIPCAP_CPU_LINEAR` decides:

    - `auto` (or unset): each kind of call (`_call_kind`: layer shape and layout, rows, packed or not) on the kernel
      measured faster on its first calls in the process (`_KernelRace`); `cpu_linear_choices()` lists the choices.
    - `onednn`: every layer through oneDNN, without measuring.
    - `default`: PyTorch's default, without measuring.

    Anything else raises a ValueError.
    """
    requested = _requested_cpu_linear()
    if model.device.type != "cpu" or model.dtype != torch.float32 or not onednn_linear_available():
        return "default"
    return requested


def cpu_linear_kernels(model: nn.Module, prepack: bool = False) -> contextlib.AbstractContextManager[None]:
    """
    A context manager for inference with `model` (a transformers model) that runs its fp32 linear layers on the CPU
    kernels `cpu_linear_mode(model)` says: by default each kind of call on whichever of MKL and oneDNN its first calls
    measured faster, so that it is never clearly slower than plain PyTorch. A context that changes nothing for other
    models, or without oneDNN. `ClipCapForConditionalGeneration.generate()` runs within it.

    Hold one block with `prepack=True` over many `generate()` calls with unchanged weights (a captioning run): each
    weight computed through oneDNN is packed for it once, on its first use, and `generate()`'s own block leaves the
    layers to it.
    """
    mode = cpu_linear_mode(model)
    if mode == "default":
        return contextlib.nullcontext()
    return _routed(model, prepack=prepack, measure=mode == "auto")


__all__ = [
    "CPU_LINEAR_ENV",
    "cpu_linear_choices",
    "cpu_linear_kernels",
    "cpu_linear_mode",
    "onednn_linear",
    "onednn_linear_available",
]
