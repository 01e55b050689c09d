"""open_clip image towers for ClipCap (e.g. the RN50x4 CLIP of the paper's transformer release, which HF CLIP lacks).

open_clip is imported inside the functions that need it, so that this module (which `save_pretrained` copies next to
the model code for `trust_remote_code` users) imports without it and the HF CLIP backend never needs it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

OPEN_CLIP_SCHEMAS = ("hf-hub:", "local-dir:")
# What ClipCap keeps of an open_clip model config: the image tower and its output width, nothing of the text tower.
OPEN_CLIP_MODEL_CFG_KEYS = ("embed_dim", "vision_cfg", "quick_gelu")
# open_clip's inference preprocessing defaults (`open_clip.transform.PreprocessCfg`), overridden per model/tag.
_PREPROCESS_DEFAULTS = {
    "mean": OPENAI_CLIP_MEAN,
    "std": OPENAI_CLIP_STD,
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def import_open_clip():
    """Import open_clip, or say how to install it."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            "vision_backend='open_clip' needs the open_clip package: `pip install open_clip_torch`."
        ) from error
    return open_clip


def vision_part_of_model_cfg(model_cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """
    Keep the image-tower part of an open_clip model config (`embed_dim`, `vision_cfg`, `quick_gelu`), checked.

    `source` names where the config came from, for error messages.
    """
    if not isinstance(model_cfg, dict):
        raise ValueError(f"`open_clip_model_cfg` must be a dict, got {type(model_cfg).__name__} (from {source}).")
    for key in ("embed_dim", "vision_cfg"):
        if key not in model_cfg:
            raise ValueError(
                f"`open_clip_model_cfg` (from {source}) lacks the key {key!r}; an open_clip model config has "
                "`embed_dim` and `vision_cfg`, e.g. open_clip.get_model_config('RN50x4')."
            )
    embed_dim = model_cfg["embed_dim"]
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim < 1:
        raise ValueError(f"`open_clip_model_cfg['embed_dim']` must be a positive integer, got {embed_dim!r}.")
    if not isinstance(model_cfg["vision_cfg"], dict):
        raise ValueError(
            f"`open_clip_model_cfg['vision_cfg']` must be a dict, got {type(model_cfg['vision_cfg']).__name__}."
        )
    vision_cfg = copy.deepcopy(model_cfg["vision_cfg"])
    if "timm_model_name" in vision_cfg:
        # The tower's weights come from our checkpoint (or the CLIP checkpoint); never fetch timm's ImageNet weights.
        vision_cfg["timm_model_pretrained"] = False
    return dict(zip(OPEN_CLIP_MODEL_CFG_KEYS, (embed_dim, vision_cfg, bool(model_cfg.get("quick_gelu", False)))))


def resolve_open_clip_model(model_name: str, pretrained: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    The image-tower config and the inference preprocessing of an open_clip model, as `open_clip.create_model` resolves
    them, without building the model or downloading weights.

    Args:
        model_name (`str`):
            A built-in open_clip name (`"RN50x4"`, `"ViT-B-32"`, see `open_clip.list_models()`), `"local-dir:PATH"`
            or `"hf-hub:ORG/REPO"` (a folder or Hub repository with an `open_clip_config.json`; a Hub name downloads
            that small file).
        pretrained (`str`, *optional*):
            A pretrained tag of a built-in model (`"openai"`, `"laion2b_s32b_b79k"`, see
            `open_clip.list_pretrained_tags_by_model(model_name)`) or a local weights file. Its preprocessing (mean,
            std, interpolation) and activation (`quick_gelu`) apply.

    Returns:
        `(model_cfg, preprocess_cfg)`: `model_cfg` has `embed_dim`, `vision_cfg` and `quick_gelu`; `preprocess_cfg`
        has `size`, `mean`, `std`, `interpolation` and `resize_mode`.
    """
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"`open_clip_model_name` must be a non-empty string, got {model_name!r}.")
    if model_name.startswith(OPEN_CLIP_SCHEMAS):
        if pretrained is not None:
            raise ValueError(
                f"`open_clip_pretrained` must be None for {model_name!r}: the weights of a 'local-dir:' or 'hf-hub:' "
                f"open_clip model come with it (got {pretrained!r})."
            )
        model_cfg, tag_cfg = _read_open_clip_json_config(model_name)
    else:
        open_clip = import_open_clip()
        name = model_name.replace("/", "-")  # open_clip accepts "ViT-B/32" for "ViT-B-32"
        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            raise ValueError(
                f"Unknown open_clip model {model_name!r}: `open_clip_model_name` must be one of "
                "open_clip.list_models() (e.g. 'RN50x4', 'ViT-B-32', 'ViT-H-14'), a 'local-dir:' or 'hf-hub:' name; "
                "or give `open_clip_model_cfg`."
            )
        tag_cfg = {}
        if pretrained is not None:
            tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
            if not tag_cfg and not Path(pretrained).is_file():
                raise ValueError(
                    f"Unknown open_clip pretrained tag {pretrained!r} for {model_name!r}: `open_clip_pretrained` "
                    f"must be one of {open_clip.list_pretrained_tags_by_model(name)} or a weights file."
                )
        # open_clip.create_model keeps the architecture's activation and only warns when the tag was trained with
        # QuickGELU (OpenAI's weights); we follow the weights, as OpenAI CLIP does.
        model_cfg["quick_gelu"] = bool(model_cfg.get("quick_gelu", False) or tag_cfg.get("quick_gelu", False))
    model_cfg = vision_part_of_model_cfg(model_cfg, source=repr(model_name))
    preprocess_cfg = {key: tag_cfg.get(key) or default for key, default in _PREPROCESS_DEFAULTS.items()}
    preprocess_cfg["size"] = model_cfg["vision_cfg"].get("image_size", 224)
    return model_cfg, preprocess_cfg


def _read_open_clip_json_config(model_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """`model_cfg` and `preprocess_cfg` of a 'local-dir:' or 'hf-hub:' open_clip model (its open_clip_config.json)."""
    schema, identifier = model_name.split(":", 1)
    if schema == "local-dir":
        path = Path(identifier) / "open_clip_config.json"
        if not Path(identifier).is_dir():
            raise FileNotFoundError(f"{model_name!r}: the folder {identifier} does not exist.")
        if not path.is_file():
            raise FileNotFoundError(f"{model_name!r} names no open_clip model folder: {path} does not exist.")
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(identifier, "open_clip_config.json")
    # Not `file_utils.read_json`: this module is saved with the model's code, and for a local folder transformers
    # 4.57 copies only the modules that the loaded one imports directly, so it must not import another one.
    with open(path, encoding="utf-8") as file:
        try:
            config = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(config, dict) or "model_cfg" not in config:
        raise ValueError(f"{path} has no 'model_cfg' entry; it is not an open_clip model config.")
    return config["model_cfg"], config.get("preprocess_cfg", {})


def _add_computed_buffers(module: ClipCapOpenClipVisionModel, state_dict: dict, prefix: str, local_metadata) -> None:
    for name, buffer in module.named_buffers():
        if name in module.computed_buffers:
            state_dict.setdefault(prefix + name, buffer.detach())


class ClipCapOpenClipVisionModel(nn.Module):
    r"""
    An open_clip image tower (`CLIP.visual`: a ViT, a ModifiedResNet or a timm model) that returns the projected
    image embedding, as open_clip's `CLIP.encode_image` does (unnormalised).

    Built from a model config alone, the tower has open_clip's random initialisation and its weights come from a
    ClipCap checkpoint; [`~ClipCapOpenClipVisionModel.from_open_clip_pretrained`] loads open_clip's pretrained weights.

    Args:
        model_cfg (`dict`):
            `embed_dim`, `vision_cfg` and `quick_gelu`, as in `ClipCapConfig.open_clip_model_cfg`.
        visual (`nn.Module`, *optional*):
            An already built tower for this config (e.g. `open_clip.create_model(...).visual`).
    """

    def __init__(self, model_cfg: dict[str, Any], visual: nn.Module | None = None):
        super().__init__()
        built_here = visual is None
        if built_here:
            import_open_clip()
            # open_clip builds towers with this function in `CLIP.__init__`; calling it directly skips the text tower.
            from open_clip.model import _build_vision_tower

            visual = _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"], model_cfg["quick_gelu"])
        self.visual = visual
        # What a ClipCap config must hold to be saved with this tower, as the config keeps it.
        self.model_cfg = vision_part_of_model_cfg(model_cfg, "the open_clip tower's model config")
        # Buffers that timm towers compute in their constructor and keep out of the state dict (EVA's and PE-Core's
        # rotary tables, Swin's relative position indices), by name. transformers 5 builds a model on the meta device
        # and leaves such buffers uninitialised when it loads one (NaN embeddings): they are saved with the weights,
        # and a folder without them gets them computed again (`recompute_buffers`).
        self.computed_buffers = frozenset(name for name, _ in self.named_buffers() if name not in self.state_dict())
        if built_here:
            self._save_computed_buffers()
        elif self.computed_buffers:  # a caller's modules stay as they are: added to this wrapper's state dict only
            self.register_state_dict_post_hook(_add_computed_buffers)

    def _save_computed_buffers(self) -> None:
        """Put the computed buffers in the state dict, as persistent buffers: in this tower's own modules only (a
        model loading a folder needs them so, or transformers 5 replaces them after loading them)."""
        for module in self.visual.modules():
            module._non_persistent_buffers_set.clear()

    def recompute_buffers(self, names: Sequence[str]) -> None:
        """
        Compute the buffers `names` (of `computed_buffers`) again, as the tower's constructor does: from a new tower
        built on the CPU from the same config (the cost of one random initialisation of the tower).
        """
        with torch.device("cpu"):
            fresh = dict(ClipCapOpenClipVisionModel(self.model_cfg).named_buffers())
        for name in names:
            module_name, _, buffer_name = name.rpartition(".")
            module = self.get_submodule(module_name)
            current = getattr(module, buffer_name)
            value = fresh[name].to(current.device)
            module._buffers[buffer_name] = value.to(current.dtype) if value.is_floating_point() else value

    @classmethod
    def from_open_clip_pretrained(
        cls, model_name: str, pretrained: str | None = None, model_cfg: dict[str, Any] | None = None
    ) -> ClipCapOpenClipVisionModel:
        """
        The image tower of `open_clip.create_model(model_name, pretrained)`, with its pretrained weights (downloaded by
        open_clip for a tag or a Hub name). `model_cfg` is the resolved config, when the caller already has it.
        """
        open_clip = import_open_clip()
        if pretrained is None and not model_name.startswith(OPEN_CLIP_SCHEMAS):
            raise ValueError(
                f"Loading pretrained open_clip {model_name!r} needs a pretrained tag, e.g. "
                f"{open_clip.list_pretrained_tags_by_model(model_name.replace('/', '-'))}."
            )
        if model_cfg is None:
            model_cfg = resolve_open_clip_model(model_name, pretrained)[0]
        try:
            clip_model = open_clip.create_model(
                model_name,
                pretrained=pretrained,
                force_quick_gelu=model_cfg["quick_gelu"],
                require_pretrained=True,
            )
        except RuntimeError as error:  # open_clip reports a failed download or missing weights file this way
            tag = f" (pretrained tag {pretrained!r})" if pretrained else ""
            raise OSError(
                f"Could not load the pretrained weights of open_clip {model_name!r}{tag}: {str(error).strip()} "
                "Without network access, give a folder holding open_clip_config.json and the weights "
                "(open_clip_model.safetensors) as local-dir:PATH."
            ) from error
        tower = cls(model_cfg, visual=clip_model.visual)
        tower._save_computed_buffers()  # its CLIP is this method's own, and goes with it
        return tower

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def fixed_image_size(self) -> tuple[int, int] | None:
        """
        The `(height, width)` of the images the tower takes, the only size its position embeddings fit (open_clip's
        ViT and ModifiedResNet towers); `None` for a timm tower, which its config does not fix to one size.
        """
        vision_cfg = self.model_cfg["vision_cfg"]
        if vision_cfg.get("timm_model_name"):
            return None
        size = vision_cfg.get("image_size", 224)  # open_clip's default (`CLIPVisionCfg.image_size`)
        return (size, size) if isinstance(size, int) else tuple(size)

    def forward(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """The projected image embedding, shape `(batch_size, embed_dim)`."""
        embeds = self.visual(pixel_values)
        # Towers with `output_tokens` (CoCa's) also return their token embeddings: `(pooled, tokens)`, as CoCa's
        # `encode_image` reads them. Taken here rather than switched off in the config, so that towers open_clip built
        # (pretrained ones) and configs saved before are read the same way.
        return embeds[0] if isinstance(embeds, tuple) else embeds


__all__ = ["ClipCapOpenClipVisionModel", "resolve_open_clip_model"]
