"""Export a ClipCap model to ONNX, in the layout of transformers.js and ONNX Runtime's generation examples.

A folder `clipcap export-onnx` writes:

    config.json, generation_config.json, processor files     (as `save_pretrained` writes them, without weights)
    onnx/vision_encoder.onnx        pixel_values (batch, 3, H, W)          -> prefix_embeds (batch, prefix, hidden)
    onnx/mapping_network.onnx       image_embeds (batch, prefix_dim)       -> prefix_embeds   (precomputed CLIP)
    onnx/embed_tokens.onnx          input_ids (batch, length)              -> inputs_embeds (batch, length, hidden)
    onnx/decoder_model_merged.onnx  inputs_embeds, attention_mask, position_ids, past_key_values.{i}.key/value,
                                    optionally num_logits_to_keep (default 0: every position)
                                    -> logits, present.{i}.key/value; metadata clipcap.learned_position_limit
    onnx/*_quantized.onnx           the same graphs with int8 weights (ONNX Runtime's dynamic quantization: a scale
                                    per output column of each matrix product's weight, one per embedding table)

The decoder is "merged" as transformers.js's current exports are: one graph for the first step (past of length 0)
and the cached steps, rather than optimum's older If-node merge of two graphs.

Why PyTorch's exporter and not optimum's: optimum-onnx (0.1) requires transformers < 4.58, so it cannot be
installed beside transformers 5, and its exporter has no task for a prefix-conditioned decoder; the graphs below
are small wrappers over the model's own modules, exported with `torch.onnx.export(dynamo=True)`, the exporter
PyTorch maintains (the TorchScript-based one is deprecated).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
import secrets
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil
import torch
import transformers
from torch import nn
from transformers import DynamicCache

from ..modeling_clipcap import CACHE_NAME, ClipCapForConditionalGeneration
from ..processing_clipcap import ClipCapProcessor
from ..utils.file_utils import FileLocksUnsupportedError, acquire_file_lock, check_output_folder, move_entries
from ..utils.logs import dropped_log_messages

if TYPE_CHECKING:
    from filelock import BaseFileLock

ONNX_SUBFOLDER = "onnx"
GRAPHS = ("vision_encoder", "mapping_network", "embed_tokens", "decoder_model_merged")
QUANTIZED_SUFFIX = "_quantized"
LOGITS_TO_KEEP = "num_logits_to_keep"  # the decoder's optional input, named as transformers.js names it
# The decoder graph's metadata entry for the size of the language model's learned position table ("none" for rotary
# or ALiBi positions), which the captioner keeps captions within; the graph cannot say it, and its config alone does
# not tell a learned table from rotary positions.
POSITION_LIMIT_KEY = "clipcap.learned_position_limit"
# In an export's staging folder: the entries of the output folder it replaces, deleted with it once it is done, and
# the mark that a failed move could not put them back, so that no cleaner deletes them.
_REPLACED = "previous"
_KEPT = "EARLIER_FILES_NOT_PUT_BACK"
# Exported with ONNX's own file limit in mind: a graph over 2 GB must keep its weights in a `.onnx.data` file beside
# it, which neither the browser page nor a single-file download wants for smaller models.
_SINGLE_FILE_LIMIT = 2_000_000_000
OPSET = 18
# An export is written into `<output>/.export-<host>-<pid>-<random>.partial` (made as `<that>.new`: see
# `_make_staging`) and moved in once whole; the host and process name it, and the export holds the lock on its
# `_STAGING_LOCK` file for its whole life, so that a later export can tell one abandoned by a killed process (see
# `abandoned_exports`).
_STAGING_NAME = re.compile(r"\.export-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]+\.partial(?:\.new)?")
_STAGING_LOCK = ".export.lock"
# An export locks its `.new` staging folder the instant after making it: one still unlocked this long after was left
# by a process killed in between, while a younger one may be another container's running export (see
# `abandoned_exports`), about to lock it.
_LOCKING_GRACE_S = 60.0
_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])


class PrefixEncoder(nn.Module):
    """
    Images -> the prefix vectors, from `pixel_values` (the CLIP tower, then the mapping network: the vision encoder
    graph) or from precomputed CLIP `image_embeds` (the mapping network, its normalisation included, alone).
    """

    def __init__(self, model: ClipCapForConditionalGeneration, input_name: str):
        super().__init__()
        self.model = model
        self.input_name = input_name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.get_prefix_embeds(**{self.input_name: images})


class EmbedTokens(nn.Module):
    """Token ids -> the language model's input embeddings (each generated token is fed back through this graph)."""

    def __init__(self, model: ClipCapForConditionalGeneration):
        super().__init__()
        self.embeddings = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)


class MergedDecoder(nn.Module):
    """
    The language model over `inputs_embeds` with its key/value cache given and returned as plain tensors, one key and
    one value per layer, shaped (batch, kv_heads, past_length, head_dim). A past of length 0 is the first step.

    `num_logits_to_keep` (a scalar) is transformers.js's name for transformers' `logits_to_keep`: the logits of the
    last that many positions only (0: every position). A decoding step needs only the last one's, and the first
    step, over the whole prefix, then skips the language-model head's vocabulary-wide product at the other positions.
    """

    def __init__(self, model: ClipCapForConditionalGeneration):
        super().__init__()
        self.language_model = model.language_model
        self.num_layers = model.config.text_config.num_hidden_layers
        # Not every transformers 4.x language model takes it (OPT): its logits are then selected after the head.
        self.takes_logits_to_keep = "logits_to_keep" in inspect.signature(self.language_model.forward).parameters

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        num_logits_to_keep: torch.Tensor,
        *past_key_values: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        pairs = [(past_key_values[2 * i], past_key_values[2 * i + 1]) for i in range(self.num_layers)]
        cache = DynamicCache(pairs, config=self.language_model.config)
        # The kept positions as an index tensor: the exporter cannot slice with the integer form of a graph input.
        length = inputs_embeds.shape[1]
        # 0 keeps every position, and so does a number past them, as transformers' `logits_to_keep` does.
        keep_all = (num_logits_to_keep <= 0) | (num_logits_to_keep > length)
        keep = torch.where(keep_all, length, num_logits_to_keep).item()
        torch._check(keep >= 1)
        torch._check(keep <= length)
        kept_positions = torch.arange(length - keep, length)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            return_dict=True,
            **{CACHE_NAME: cache},
            **({"logits_to_keep": kept_positions} if self.takes_logits_to_keep else {}),
        )
        logits = outputs.logits if self.takes_logits_to_keep else outputs.logits[:, kept_positions]
        present = getattr(outputs, CACHE_NAME)
        return (logits, *(tensor for layer in present.layers for tensor in (layer.keys, layer.values)))


def cache_shape(model: ClipCapForConditionalGeneration) -> tuple[int, int]:
    """(key/value heads, head width) of the language model's cache."""
    text_config = model.config.text_config
    if text_config.model_type == "falcon":
        heads = _falcon_cache_heads(text_config)
    else:
        heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return heads, head_dim


def _falcon_cache_heads(text_config) -> int:
    """
    The key/value heads Falcon's attention caches, counted as it counts them: transformers 4.x's config has no
    `num_key_value_heads`, and a config saved by one version may hold the other's.
    """
    if text_config.new_decoder_architecture:
        # transformers 4.x broadcasts each group's key and value to its query heads before caching them.
        return text_config.num_kv_heads if _TRANSFORMERS_MAJOR >= 5 else text_config.num_attention_heads
    if text_config.multi_query:  # falcon-7b's layout, and FalconConfig's default
        return 1
    return text_config.num_attention_heads


def past_names(num_layers: int, prefix: str = "past_key_values") -> list[str]:
    """The cache's input names (`present` for the outputs), one key and one value per layer, in the graph's order."""
    return [f"{prefix}.{layer}.{part}" for layer in range(num_layers) for part in ("key", "value")]


def _export(
    module: nn.Module,
    args: tuple,
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: tuple,
    input_defaults: dict[str, int] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """
    One graph with `torch.onnx.export(dynamo=True)`, its weights inside it unless they pass ONNX's 2 GB limit.
    `input_defaults` gives integer scalar inputs a value used where a caller does not feed them; `metadata` goes into
    the model's metadata (ONNX Runtime's `session.get_modelmeta().custom_metadata_map`).
    """
    module.eval()
    with warnings.catch_warnings():
        # One `Dim` object names an axis that several inputs share (the batch), as torch.export means it to; the
        # exporter warns for each input after the first that the name is already taken, which is the intent.
        warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used", category=UserWarning)
        program = torch.onnx.export(
            module,
            args,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
            custom_translation_table=_translations(),
        )
    import onnx_ir  # (installed with onnxscript, which the exporter needs)

    for name, default in (input_defaults or {}).items():
        # An input that is also an initializer is optional in ONNX: ONNX Runtime (and onnxruntime-web) list only the
        # other inputs as the session's inputs, and use the initializer where the input is not fed.
        graph_input = next(value for value in program.model.graph.inputs if value.name == name)
        graph_input.const_value = onnx_ir.tensor(np.array(default, np.int64), name=name)
        program.model.graph.register_initializer(graph_input)
    program.model.metadata_props.update(metadata or {})
    # The graph's own weights: a wrapper module holds the whole model, whose other parts this graph may not use.
    weight_bytes = sum(value.const_value.nbytes for value in program.model.graph.initializers.values())
    program.save(str(path), external_data=weight_bytes > _SINGLE_FILE_LIMIT)


@functools.cache
def _translations() -> dict:
    """
    ONNX functions for the ATen operators that the exporter has none for: `_is_all_true`, which transformers'
    SigLIP2 tower asserts its patch grid with (`torch_compilable_check`), computed as it is, its assertion then
    dropped as every other in the exported graph.
    """
    from onnxscript import opset18 as op
    from onnxscript.onnx_types import BOOL, INT32

    def is_all_true(values):
        return op.Cast(op.ReduceMin(op.Cast(values, to=INT32.dtype), keepdims=0), to=BOOL.dtype)

    return {torch.ops.aten._is_all_true.default: is_all_true}


@torch.no_grad()
def export_graphs(
    model: ClipCapForConditionalGeneration, output_dir: str | os.PathLike, image_size: int
) -> dict[str, Path]:
    """
    Write the four fp32 graphs of `model` (put in fp32 and eval mode, in place) into `output_dir`, for images of
    `image_size` pixels square (the processor's crop size); returns their paths by name.
    """
    config = model.config
    # (An open_clip tower has no `vision_config`.)
    if getattr(config.vision_config, "model_type", None) == "siglip2_vision_model" and _TRANSFORMERS_MAJOR < 5:
        raise ValueError(
            "A SigLIP2 vision tower exports with transformers 5 or later: the tower of transformers "
            f"{transformers.__version__} resizes its position embeddings to sizes computed from its inputs, which "
            'torch.export cannot trace. Upgrade transformers (pip install -U "transformers>=5") to export this model.'
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    batch, length = torch.export.Dim("batch"), torch.export.Dim("sequence_length")
    paths = {name: output_dir / f"{name}.onnx" for name in GRAPHS}

    pixel_values = torch.randn(2, 3, image_size, image_size)
    _export(PrefixEncoder(model, "pixel_values"), (pixel_values,), paths["vision_encoder"], ["pixel_values"],
            ["prefix_embeds"], ({0: batch},))
    image_embeds = torch.randn(2, config.prefix_dim)
    _export(PrefixEncoder(model, "image_embeds"), (image_embeds,), paths["mapping_network"], ["image_embeds"],
            ["prefix_embeds"], ({0: batch},))
    input_ids = torch.zeros(2, 3, dtype=torch.long)
    _export(EmbedTokens(model), (input_ids,), paths["embed_tokens"], ["input_ids"], ["inputs_embeds"],
            ({0: batch, 1: length},))

    # Example inputs with a non-empty past, so that the exporter keeps every length symbolic; the graph then runs
    # with a past of length 0 too. Sizes 0 and 1 would be specialised to constants.
    decoder = MergedDecoder(model)
    num_layers = decoder.num_layers
    heads, head_dim = cache_shape(model)
    past_length, new_length = 3, 2
    inputs_embeds = torch.randn(2, new_length, config.text_embedding_size)
    attention_mask = torch.ones(2, past_length + new_length, dtype=torch.long)
    position_ids = torch.arange(past_length, past_length + new_length).expand(2, -1)
    num_logits_to_keep = torch.tensor(1)
    past = tuple(torch.randn(2, heads, past_length, head_dim) for _ in range(2 * num_layers))
    past_length_dim, total_length = torch.export.Dim("past_sequence_length"), torch.export.Dim("total_sequence_length")
    dynamic_shapes = (
        {0: batch, 1: length},
        {0: batch, 1: total_length},
        {0: batch, 1: length},
        None,
        tuple({0: batch, 2: past_length_dim} for _ in past),  # the forward's *past_key_values
    )
    _export(
        decoder,
        (inputs_embeds, attention_mask, position_ids, num_logits_to_keep, *past),
        paths["decoder_model_merged"],
        ["inputs_embeds", "attention_mask", "position_ids", LOGITS_TO_KEEP, *past_names(num_layers)],
        ["logits", *past_names(num_layers, "present")],
        dynamic_shapes,
        # Every position's logits by default, as before the input existed: callers that do not know it (the browser
        # page, transformers.js, which feeds it only where the session lists it as an input) get what they expect.
        input_defaults={LOGITS_TO_KEEP: 0},
        metadata={POSITION_LIMIT_KEY: str(model._learned_position_limit() or "none")},
    )
    return paths


def quantize_graphs(paths: dict[str, Path], per_channel: bool = True) -> dict[str, Path]:
    """
    int8 copies (`NAME_quantized.onnx`) of the graphs: ONNX Runtime's dynamic quantization of their weights, with a
    scale per output channel of each weight matrix (`per_channel`) or one per matrix; embedding tables get one each.
    """
    QuantType, quantize_dynamic = _quantization_api()
    quantized = {}
    # The graphs are quantized as exported, with the operators onnxruntime-web runs (tests/test_onnx_web.py): ONNX
    # Runtime's advice, logged for every graph, to run its pre-processing first is not the user's to act on.
    with dropped_log_messages("Please consider to run pre-processing before quantization"):
        for name, path in paths.items():
            target = path.with_name(f"{name}{QUANTIZED_SUFFIX}.onnx")
            # Unsigned 8-bit weights: with signed ones, ONNX Runtime's x86 kernels and onnxruntime-web's WebAssembly
            # ones gave different greedy tokens on the same graph (tests/test_onnx_web.py); with unsigned ones they
            # agree. Convolutions (CLIP's patch embedding) stay fp32: onnxruntime-web has no ConvInteger kernel.
            # An fp32 graph too large for one file (see `_export`) gives an int8 one kept beside its weights too:
            # ONNX Runtime saves the quantized graph as one file otherwise, which fails past 2 GB.
            quantize_dynamic(path, target, weight_type=QuantType.QUInt8,
                             op_types_to_quantize=["MatMul", "Gemm", "Gather"], per_channel=per_channel,
                             use_external_data_format=_uses_external_data(path))
            quantized[name] = target
    return quantized


def _quantization_api() -> tuple:
    """onnxruntime's `QuantType` and `quantize_dynamic`, or an error naming the install and the fp32-only export."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as error:
        raise ImportError(
            'int8 export needs onnxruntime: pip install "clipcap_hf[onnx]", or export the fp32 graphs only '
            "(`clipcap export-onnx --no-int8`, `export_onnx(..., quantize=False)`)."
        ) from error
    return QuantType, quantize_dynamic


def _uses_external_data(path: Path) -> bool:
    """Whether the ONNX graph at `path` keeps weights in a file beside it (read without loading them)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(uses_external_data(tensor) for tensor in graph.initializer)


def check_export_dependencies(quantize: bool = True) -> None:
    """
    Refuse, before any export work, an export whose packages are missing: onnx and onnxscript (PyTorch's exporter
    needs both), and, when `quantize`, onnxruntime's quantization (the int8 copies are made after the whole fp32
    export, which would be thrown away).
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError('ONNX export needs onnx and onnxscript: pip install "clipcap_hf[onnx]"') from error
    if quantize:
        _quantization_api()


def check_export_folder(
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    option: str = "output_dir",
    overwrite_option: str = "overwrite=True",
) -> None:
    """
    Refuse, before any export work, an `output_dir` (given as `option`) that cannot be written, or that holds anything
    when not `overwrite` (`overwrite_option` names how to allow it): an export replaces the top-level files of its
    names and the whole `onnx/` folder. What killed exports left there does not count: the export removes it.
    """
    output_dir = Path(output_dir)
    check_output_folder(output_dir, option, "write the export to")
    if overwrite or not output_dir.is_dir():
        return
    abandoned = abandoned_exports(output_dir)
    if any(path not in abandoned for path in output_dir.iterdir()):
        raise FileExistsError(f"{option}: {output_dir} is not empty; name a new folder, or pass {overwrite_option}.")


def check_exportable_model(model: ClipCapForConditionalGeneration) -> None:
    """
    Refuse a model the CPU export cannot trace, naming what to do: one loaded by bitsandbytes (its 8- and 4-bit
    layers have no ONNX form) or with weights off the CPU (the example inputs are CPU tensors). A model quantized
    by torchao (`quantize_int8_weight_only`) exports: its int8 weights become fp32 ones in the graphs.
    """
    quantization_config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if getattr(quantization_config, "quant_method", None) == "bitsandbytes":  # (QuantizationMethod: a str enum)
        raise ValueError(
            "model: it was loaded quantized by bitsandbytes, whose 8- and 4-bit layers have no ONNX form; load it "
            "in full precision (without `quantization_config`) to export it: the int8 graphs (quantize=True) are "
            "ONNX Runtime's own quantization."
        )
    devices = sorted({str(tensor.device) for tensor in (*model.parameters(), *model.buffers())} - {"cpu"})
    if devices:
        raise ValueError(
            f"model: its weights are on {', '.join(devices)}; the export runs on the CPU: move the model there "
            "first (model.to('cpu'))."
        )


def export_onnx(
    model: ClipCapForConditionalGeneration,
    processor: ClipCapProcessor,
    output_dir: str | os.PathLike,
    quantize: bool = True,
    per_channel: bool = True,
    overwrite: bool = False,
) -> dict[str, Path]:
    """
    Export `model` (with `processor` beside it) to `output_dir`: the config, generation config and processor files
    at its top, the graphs under `onnx/` (fp32, and int8 when `quantize`, with a weight scale per output channel, or
    per matrix without `per_channel`). Returns the graphs' paths by name (`vision_encoder`, ..., and
    `vision_encoder_quantized`, ...). The model is put in fp32 and eval mode, in place.

    An `output_dir` that holds anything is refused unless `overwrite`; then the export's files replace their
    namesakes there, and its `onnx/` folder the earlier one whole (graphs of other names included), other files stay.
    """
    check_export_dependencies(quantize)
    check_exportable_model(model)
    check_export_folder(output_dir, overwrite)
    from ..utils.file_utils import save_pretrained

    output_dir = Path(output_dir)
    # Written into a hidden folder inside output_dir (so on its filesystem, whether it is a mount point or a link)
    # and moved in once whole: an export that fails or is stopped part-way (an exporter error, Ctrl-C, a full disk)
    # leaves an earlier export there as it was, and the folders it created (output_dir and the parents it lacked) are
    # removed again. One whose process was killed (no cleanup ran) is removed by the next export into the folder.
    created = [folder for folder in (output_dir, *output_dir.parents) if not folder.exists()]  # output_dir first
    for abandoned in abandoned_exports(output_dir):
        shutil.rmtree(abandoned, ignore_errors=True)
    staging = output_dir / f".export-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.partial"
    lock = None
    try:
        lock = _make_staging(staging)
        model.config.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        save_pretrained(staging, processor)
        paths = export_graphs(model, staging / ONNX_SUBFOLDER, processor.image_processor.crop_size)
        if quantize:
            quantized = quantize_graphs(paths, per_channel=per_channel)
            paths.update({f"{name}{QUANTIZED_SUFFIX}": path for name, path in quantized.items()})
        _move_into(staging, output_dir)
    except BaseException:
        _release(lock)  # first: Windows cannot delete a file open in this process
        if _holds_entries(staging / _REPLACED):  # an earlier export's files that could not be put back: kept
            with contextlib.suppress(OSError):
                (staging / _KEPT).touch()  # so that no later export removes them with the folder
        else:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break  # no longer empty: another process wrote there meanwhile, and its files stay
        raise
    _release(lock)
    shutil.rmtree(staging, ignore_errors=True)
    return {name: output_dir / ONNX_SUBFOLDER / path.name for name, path in paths.items()}


def _make_staging(staging: Path) -> BaseFileLock | None:
    """
    Create the staging folder `staging` (and its parents) holding the lock on its `_STAGING_LOCK` file, and return
    the lock, which the export keeps until it has moved its files out (None where the filesystem cannot lock).
    """
    # Made under another name and renamed once the lock is held, so that another export's cleaner never finds the
    # `.partial` folder without its lock file (which it would judge, as an older version's, by the PID alone); the
    # `.new` folder of a process killed before the rename is judged alike (see `abandoned_exports`). Not on Windows,
    # which cannot rename a folder with a file open in it, and where no cleaner runs.
    setup = staging if os.name == "nt" else staging.with_name(f"{staging.name}.new")
    setup.mkdir(parents=True)
    lock = None
    try:
        try:
            lock = acquire_file_lock(setup / _STAGING_LOCK, "the ONNX export's staging folder", timeout=0)
        except FileLocksUnsupportedError:
            pass  # no process can lock there: cleaners judge its folders by the PID alone, as before
        if setup != staging:
            os.replace(setup, staging)
    except BaseException:
        _release(lock)
        shutil.rmtree(setup, ignore_errors=True)
        raise
    return lock


def _release(lock: BaseFileLock | None) -> None:
    if lock is not None:
        lock.release()


def abandoned_exports(output_dir: str | os.PathLike) -> list[Path]:
    """
    The staging folders in `output_dir` that exports on this machine left when their process was killed part-way
    (`.partial`, or `.partial.new` when killed while making it): their process has ended, and no process holds the
    lock on their `_STAGING_LOCK` file (which an export holds for its whole life, and the OS releases however its
    process ends). Those of other machines sharing the folder, or of a process still running, are not listed; nor any
    on Windows, where no process is probed.

    The lock is what keeps a running export safe from a container that shares this machine's host name but not its
    processes (`docker run --net=host`, or a fixed `hostname:` in compose, with a shared volume): its process IDs are
    not this one's, so its running export's looks ended. A folder without a lock file (an older version's, or one on
    a filesystem that cannot lock) is judged by its process alone, as before; a `.new` one, once it is
    `_LOCKING_GRACE_S` old (its process was killed before it took the lock).
    """
    if os.name == "nt" or not Path(output_dir).is_dir():
        return []
    host = socket.gethostname()
    abandoned = []
    for path in Path(output_dir).glob(".export-*"):
        match = _STAGING_NAME.fullmatch(path.name)
        if (
            match
            and match["host"] == host
            and not psutil.pid_exists(int(match["pid"]))
            and not _staging_lock_held(path)
            and not (path / _KEPT).exists()  # an earlier export's files a failed move could not put back
        ):
            abandoned.append(path)
    return abandoned


def _staging_lock_held(staging: Path) -> bool:
    """Whether a process holds the lock on the `staging` folder's `_STAGING_LOCK` file, or may: one that cannot be
    probed (its folder just removed, or another account's) counts as held, and so does a `.new` folder without its
    lock file for `_LOCKING_GRACE_S` after it was made, so that the folder is kept."""
    from filelock import Timeout  # a dependency of huggingface_hub, so always installed

    lock_file = staging / _STAGING_LOCK
    if not lock_file.is_file():
        if staging.name.endswith(".new"):  # made, and not locked yet (its mtime: when it was made, still empty)
            try:
                return time.time() - staging.stat().st_mtime < _LOCKING_GRACE_S
            except FileNotFoundError:
                return True  # removed meanwhile: nothing to remove
        return False  # an older version's folder (see `abandoned_exports`)
    try:
        acquire_file_lock(lock_file, "the ONNX export's staging folder", timeout=0).release()
    except FileLocksUnsupportedError:
        return False  # no process can lock there (see `_make_staging`)
    except (Timeout, OSError):
        return True
    return False


def _move_into(staging: Path, output_dir: Path) -> None:
    """
    Move a finished export into `output_dir`, keeping its other files: the top-level files replace their namesakes,
    the graphs' folder replaces the previous one whole, so that a previous export's graphs that this one does not
    write (its int8 copies, say) do not outlive it (the captioner would run them with this model's config). What is
    replaced goes into the staging folder, deleted with it; a move stopped part-way puts it back.
    """
    # The lock stays, held, until the export is done.
    names = [path.name for path in staging.iterdir() if path.name != _STAGING_LOCK]
    move_entries(staging, output_dir, staging / _REPLACED, names)


def _holds_entries(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())
