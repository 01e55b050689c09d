"""LoRA adapters (peft) on the language model: adding them (QLoRA on an 8- or 4-bit language model too), reloading
a run's adapters, merging them."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..modeling_clipcap import ClipCapForConditionalGeneration
from ..processing_clipcap import ClipCapProcessor
from ..utils.file_utils import save_pretrained, write_folder_atomically
from ..utils.loading import check_clipcap_model
from ..utils.quantization import is_quantized
from .arguments import ModelArguments

# Where a LoRA run that assembled a new model saves it, inside its output_dir: the adapters' base.
BASE_MODEL_DIR = "base_model"


def lora_base_model(adapter_dir: str | os.PathLike) -> str:
    """
    The base ClipCap of the LoRA adapters in `adapter_dir`: the model `adapter_config.json` records (an absolute
    path or a Hub name), unless that record is a run's own `base_model` folder which no longer exists there (the run
    folder was moved or copied elsewhere): then the run's own copy, `adapter_dir`'s `base_model` folder (or the one
    beside it, for one of the run's `checkpoint-N` folders).
    """
    from peft import PeftConfig

    recorded = PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    # A `base_model` folder left in the same output_dir by an earlier run must not win over an existing record.
    if os.path.basename(os.path.normpath(recorded)) != BASE_MODEL_DIR or os.path.exists(recorded):
        return recorded
    folder = os.path.abspath(adapter_dir)
    own_copies = [os.path.join(folder, BASE_MODEL_DIR)]
    if re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", os.path.basename(folder)):
        own_copies.append(os.path.join(os.path.dirname(folder), BASE_MODEL_DIR))
    for own_copy in own_copies:
        if os.path.isfile(os.path.join(own_copy, "config.json")):
            return own_copy
    return recorded


def lora_target_modules(model: ClipCapForConditionalGeneration, names: Sequence[str] | None = None) -> str:
    """
    A peft regex matching the language model's layers called `names` (e.g. `["c_attn"]`); by default every linear
    layer of the language model except its output layer.
    """
    # Built here rather than with peft's "all-linear", which would also adapt the frozen CLIP tower and the mapper
    # (which is trained in full, as a `modules_to_save`).
    names = names or _linear_layer_names(model)
    # A name matches a module path that is it or ends with "." + it (as peft matches a list of names).
    return rf"language_model\.(?:.*\.)?({'|'.join(sorted(map(re.escape, names)))})"


def _linear_layer_names(model: ClipCapForConditionalGeneration) -> list[str]:
    """The names (last parts) of the language model's linear layers, but its output layer: those adapted by default."""
    output_layer = model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.language_model.named_modules()
            if isinstance(module, (torch.nn.Linear, transformers.pytorch_utils.Conv1D)) and module is not output_layer
        }
    )


def add_lora(model: ClipCapForConditionalGeneration, model_args: ModelArguments):
    """
    Wrap the model in a peft `PeftModel`: LoRA adapters on the language model, the mapping network fully trained
    (and saved with the adapters, as a `modules_to_save`), everything else frozen.

    A model loaded with its language model in 8 or 4 bits (`utils.quantization.load_quantized`) gets QLoRA: peft's
    preparation for k-bit training first (quantized weights frozen, layer norms and the other full-precision weights
    in fp32, input gradients on so that the adapters get theirs), then the same adapters.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    check_lora_target_modules(model, model_args)
    if is_quantized(model):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    names = _target_module_names(model_args)
    # GPT-2's Conv1D layers store their weight transposed (fan_in_fan_out); peft would set the flag itself, with a
    # warning for each layer, so it is set here.
    conv1d = transformers.pytorch_utils.Conv1D
    lora_config = LoraConfig(
        fan_in_fan_out=any(isinstance(module, conv1d) for module in model.language_model.modules()),
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=lora_target_modules(model, names),
        modules_to_save=["mapping_network"],
    )
    return get_peft_model(model, lora_config)


def check_continued_lora_options(model, model_args: ModelArguments) -> None:
    """
    Refuse `--lora_*` options given for a run that trains the adapters of `model` (a `PeftModel`) further when they
    differ from those adapters' own: new adapters would take them, these keep theirs, so the options would be ignored.
    """
    config = model.peft_config[model.active_adapter]
    names = _target_module_names(model_args)
    adapters = {
        "lora_r": (config.r, model_args.lora_r),
        "lora_alpha": (config.lora_alpha, model_args.lora_alpha),
        "lora_dropout": (config.lora_dropout, model_args.lora_dropout),
        "lora_target_modules": (config.target_modules, lora_target_modules(model.get_base_model(), names)),
    }
    differing = [
        f"--{name} {getattr(model_args, name)} (the adapters': {adapters[name][0]})"
        for name in model_args.lora_options_given
        if adapters[name][0] != adapters[name][1]
    ]
    if differing:
        raise ValueError(
            f"{', '.join(differing)}: --model_name_or_path {model_args.model_name_or_path} holds LoRA adapters, which "
            "this run trains further as they are, so these options would be ignored. Leave them out (or give the "
            "adapters' values); for new adapters, start from the merged model (its merged/ folder, or merge_lora)."
        )


def _target_module_names(model_args: ModelArguments) -> list[str]:
    """The names `--lora_target_modules` lists (comma-separated); empty when not given."""
    return [name.strip() for name in (model_args.lora_target_modules or "").split(",") if name.strip()]


# The module types peft's LoRA adapts (peft 0.21's `dispatch_default`; bitsandbytes' quantized linear layers are
# `torch.nn.Linear`s): peft refuses another matched module only once the data are loaded.
_LORA_MODULE_TYPES = (
    torch.nn.Linear,
    torch.nn.Embedding,
    torch.nn.Conv1d,
    torch.nn.Conv2d,
    torch.nn.Conv3d,
    torch.nn.MultiheadAttention,
    transformers.pytorch_utils.Conv1D,
)


def check_lora_target_modules(model: ClipCapForConditionalGeneration, model_args: ModelArguments) -> None:
    """
    Refuse `--lora_target_modules` names that match no module of the language model, or match one peft cannot adapt
    (a layer norm, a whole block), naming them: peft would refuse only when none matches, in its own words, and adapt
    the others without a word when some do. A name matches a module whose path is it or ends with "." + it (`c_attn`,
    `attn.c_proj`), as peft matches names.
    """
    names = _target_module_names(model_args)
    modules = list(model.language_model.named_modules())
    unknown, unsupported = [], []
    for name in names:
        matched = [module for path, module in modules if path == name or path.endswith("." + name)]
        if not matched:
            unknown.append(name)
        elif not all(isinstance(module, _LORA_MODULE_TYPES) for module in matched):
            kinds = sorted({type(module).__name__ for module in matched if not isinstance(module, _LORA_MODULE_TYPES)})
            unsupported.append(f"{name} ({', '.join(kinds)})")
    problems = [f"the language model has no module called {', '.join(unknown)}"] if unknown else []
    if unsupported:
        problems.append(f"LoRA cannot adapt {', '.join(unsupported)}")
    if problems:
        raise ValueError(
            f"--lora_target_modules {model_args.lora_target_modules}: {'; '.join(problems)}. Give names of its "
            f"linear layers (adapted by default, but the output layer: {','.join(_linear_layer_names(model))}), "
            "as a last part or a dotted path ending (attn.c_proj), or leave the option out."
        )


def load_lora_model(
    adapter_dir: str | os.PathLike, base_model_name_or_path: str | None = None, is_trainable: bool = False
):
    """
    Reload a LoRA run: the base ClipCap (by default [`lora_base_model`]: the one recorded in `adapter_config.json`,
    or the run's own `base_model` folder once the run folder has moved) with the adapters and the trained mapping
    network from `adapter_dir`. Returns a `PeftModel`, frozen unless `is_trainable` (then the adapters and the mapping
    network train further); `.merge_and_unload()` gives a plain [`ClipCapForConditionalGeneration`]. Its adapters
    record the base they were loaded on (a folder as an absolute path), which adapters saved from it name.
    """
    from peft import PeftModel

    if base_model_name_or_path is None:
        base_model_name_or_path = lora_base_model(adapter_dir)
        option = f"the base model of {adapter_dir} (adapter_config.json's record, else its own base_model folder)"
    else:
        option = "base_model_name_or_path"
    check_clipcap_model(base_model_name_or_path, option)
    base = ClipCapForConditionalGeneration.from_pretrained(base_model_name_or_path, trust_remote_code=False)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable)
    # peft keeps adapter_config.json's record, which names a moved run's old base_model path (or another base than the
    # one given): adapters trained further from these would be saved naming a base they cannot load on.
    if os.path.isdir(base_model_name_or_path):
        base_model_name_or_path = os.path.abspath(base_model_name_or_path)
    for config in model.peft_config.values():
        config.base_model_name_or_path = base_model_name_or_path
    return model


def merge_lora(
    adapter_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> ClipCapForConditionalGeneration:
    """
    Merge a LoRA run's adapters into its base model and save a plain checkpoint (with the processor) as `output_dir`,
    written whole or not at all (a run's rerun merges again unless `output_dir` exists). The merged model is the
    whole folder: an `output_dir` that is not empty (the adapters' folder, a run's folder, an earlier merge) is
    refused, unless `overwrite` (then it is replaced whole, once the merge is written).
    """
    output, cwd = Path(output_dir).resolve(), Path.cwd()
    held = {"the adapters' folder": Path(adapter_dir).resolve(), "the current folder": cwd}
    for what, folder in held.items():  # replaced whole, the folder would take them with it
        if output == folder or output in folder.parents:
            raise ValueError(
                f"merge_lora: output_dir {output_dir} is or holds {what} ({folder}), and the merged model replaces "
                "the folder whole: give a folder of its own (e.g. output_dir/merged)."
            )
    if not overwrite and Path(output_dir).is_dir() and any(Path(output_dir).iterdir()):
        raise ValueError(
            f"merge_lora: output_dir {output_dir} is not empty, and the merged model is written as the whole folder: "
            "give a new or empty folder (or overwrite=True to replace an earlier merge)."
        )
    model = load_lora_model(adapter_dir, base_model_name_or_path).merge_and_unload()
    processor = ClipCapProcessor.from_pretrained(adapter_dir, trust_remote_code=False)
    write_folder_atomically(output_dir, lambda staging: save_pretrained(staging, model, processor))
    return model


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
