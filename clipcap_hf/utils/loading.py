"""Loading what users name (a `--model`, a pretrained part): ClipCap folders only, never code from a folder, and Hub
names that fail at once, naming the option to set, when the Hub cannot be reached.

Saved ClipCap folders carry the model code and an `auto_map` for `trust_remote_code` users; a folder whose
`config.json` names another model type would make transformers ask on the terminal whether to run that folder's
code. Every load here passes `trust_remote_code=False` and checks the model type first, so that never happens.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import PretrainedConfig

from ..configuration_clipcap import ClipCapConfig, local_folder
from ..modeling_clipcap import ClipCapForConditionalGeneration
from ..processing_clipcap import ClipCapProcessor
from .file_utils import read_json, sampled_sha256
from .logs import dropped_log_messages

# transformers 4.x's AutoImageProcessor tells of every saved image processor without a fast variant (as
# ClipCapImageProcessor, which has none) that it is "Using a slow image processor as `use_fast` is unset", and that
# outputs will change once fast ones are the default: neither applies. `use_fast=False` would silence it, but the
# processor passes it on to the tokenizer too, which would then load as a slow (Python) one. transformers 5 is silent.
_SLOW_IMAGE_PROCESSOR_NOTICE = "Using a slow image processor as `use_fast` is unset"
_IMAGE_PROCESSOR_LOGGER = "transformers.models.auto.image_processing_auto"
# Seconds to wait for the Hub before saying it cannot be reached (huggingface_hub would retry for about a minute).
HUB_CONNECT_TIMEOUT = 5.0
_TRUE = {"1", "ON", "YES", "TRUE"}


def _offline_variable() -> str | None:
    """The environment variable that puts transformers offline, if one does."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").upper() in _TRUE:
            return name
    return "HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else None


def _hub_unreachable() -> str | None:
    """Why the Hub (`HF_ENDPOINT`) cannot be reached, or None when a connection to it (or to its proxy) opens."""
    endpoint = urlparse(constants.ENDPOINT)
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    target = urlparse(proxy) if proxy and not urllib.request.proxy_bypass(endpoint.hostname) else endpoint
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=HUB_CONNECT_TIMEOUT).close()
    except OSError as error:
        via = f" (through the proxy {proxy})" if target is not endpoint else ""
        return f"{constants.ENDPOINT} cannot be reached{via}: {error}"
    return None


def can_only_be_a_folder(name_or_path: str) -> bool:
    """Whether `name_or_path` can only be a folder: no valid Hub id, or a path (`./clipcap-quikstart` is a valid id)."""
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return True
    return name_or_path.startswith((".", "/", "~"))


def check_pretrained_source(name_or_path: str, option: str, filenames: tuple[str, ...] = ("config.json",)) -> None:
    """
    Check, before anything is loaded, that `name_or_path` (given as `option`) can be: an existing folder holding one
    of `filenames`, or a Hub name with one of them in the local cache, or that can be downloaded. Anything else raises
    an `OSError` naming the option, at once rather than after a minute of network retries (or transformers' "Repo id
    must be in the form" for a missing folder): a file, a folder without those files, a path that does not exist, a
    Hub name that is not cached while offline (`HF_HUB_OFFLINE`) or while the Hub cannot be reached.
    """
    folder = Path(name_or_path).expanduser()
    if folder.is_file():
        raise NotADirectoryError(f"{option}: {name_or_path} is a file; give the folder that holds it.")
    if folder.is_dir():
        if not any((folder / filename).is_file() for filename in filenames):
            raise FileNotFoundError(f"{option}: {name_or_path} holds no {' or '.join(filenames)}.")
        return
    if can_only_be_a_folder(name_or_path):
        raise FileNotFoundError(f"{option}: folder {name_or_path} does not exist.")
    if any(isinstance(try_to_load_from_cache(name_or_path, filename), str) for filename in filenames):
        return
    offline = _offline_variable()
    reason = f"{offline} is set" if offline else _hub_unreachable()
    if reason is not None:
        raise OSError(
            f"{option} {name_or_path}: no such folder, and this Hub model is not in the local cache ({reason}). "
            f"Give {option} a local folder, or download the model once while online."
        )


def read_model_config(name_or_path: str, option: str) -> dict:
    """
    The `config.json` of a folder or Hub name (given as `option`), read as data after [`check_pretrained_source`]:
    no code of the folder runs.
    """
    check_pretrained_source(name_or_path, option)
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        config = read_json(folder / "config.json")
    else:
        config, _ = PretrainedConfig.get_config_dict(name_or_path)
    return config if isinstance(config, dict) else {}


def check_clipcap_model(name_or_path: str, option: str) -> None:
    """
    Refuse, before loading, a folder or Hub name whose `config.json` is not a ClipCap model's, naming it and its type.
    The config is read as data: no code of the folder runs.
    """
    model_type = read_model_config(name_or_path, option).get("model_type")
    if model_type != "clipcap":
        raise ValueError(
            f"{option}: {name_or_path} holds a model of type {model_type!r} (config.json's model_type), not a "
            "ClipCap model; give a ClipCap folder or Hub name."
        )


def check_caption_fits_positions(
    name_or_path: str, max_new_tokens: int, option: str, model_option: str = "--model"
) -> None:
    """
    Refuse, before the model loads (and before a command reads its images), a caption length `max_new_tokens` (given
    as `option`) that runs past the language model's learned position table after the image tokens: `generate` would
    refuse it only at the first batch. The model (`model_option`) is built from its config on the meta device, so
    that the table is found as `generate` finds it (none for rotary or ALiBi positions); no weight is read, and no
    code of the folder runs.
    """
    check_clipcap_model(name_or_path, model_option)
    config = ClipCapConfig.from_pretrained(local_folder(name_or_path))
    with torch.device("meta"):
        positions = ClipCapForConditionalGeneration(config)._learned_position_limit()
    needed = config.prefix_length + max_new_tokens
    if positions is not None and needed > positions:
        raise ValueError(
            f"{option} {max_new_tokens} needs {needed} positions ({config.prefix_length} image tokens, then the "
            f"caption), but the language model of {model_option} {name_or_path} has {positions} "
            f"(max_position_embeddings): give {option} {positions - config.prefix_length} or less."
        )


def check_clip_model(name_or_path: str, option: str) -> None:
    """
    Refuse, before loading, a folder or Hub name that is not a whole transformers CLIP model (`model_type` "clip"
    with a text config): a CLIP vision model alone would load as a `CLIPModel` with a random text tower.
    """
    config = read_model_config(name_or_path, option)
    model_type = config.get("model_type")
    if model_type != "clip" or not config.get("text_config"):
        kind = "a CLIP model without a text_config" if model_type == "clip" else f"a model of type {model_type!r}"
        raise ValueError(
            f"{option}: {name_or_path} holds {kind} (config.json), not a whole CLIP model: scoring captions needs "
            "both towers. Give a transformers CLIPModel folder or Hub name, such as openai/clip-vit-base-patch32."
        )


# The files of a model folder that make the model, hashed by `model_identity`; anything else there (a run's
# eval_results.json, trainer_state.json, training_args.bin, a README) leaves its identity unchanged.
# Hashed whole (small): the configs, the tokenizer files, chat templates and remote code (which changes behaviour).
_WHOLE_HASHED_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "adapter_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.json",
    "chat_template.jinja",
    "*.model",
    "*.py",
    "*.index.json",  # the weight shards' index
)
# The weight files, too large to hash whole: their size, header and first and last 64 KiB are hashed.
WEIGHT_FILE_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "adapter_model.bin")
# The largest header the safetensors library reads: a damaged file's length field cannot make us read more.
_MAX_SAFETENSORS_HEADER = 100_000_000


def model_identity(name_or_path: str) -> str | dict[str, Any]:
    """
    A cheap identity of the model a folder or Hub name holds, whatever path names it and wherever it lies on disk,
    made of its config, generation config, processor, tokenizer and code files whole, and of each weight file's size,
    header and first and last 64 KiB (a retrained model saved over it gets another identity, in milliseconds, not
    after reading gigabytes; results a run writes beside the model, or a README, are not hashed). For a folder, a
    SHA-256 of them all (`"sha256:..."`). For a Hub name, once its files are downloaded, `{"hub": name, "files":
    {file name: SHA-256}}` of the files of its cached snapshot, each on its own: a snapshot holds the files fetched so
    far, and one fetched later (a tokenizer, a fallback weight file) adds to the same model ([`same_model`]); a commit
    that changes its README alone keeps its identity. By its name alone while none is cached. Compare identities with
    [`same_model`], not `==`.
    """
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        digest = hashlib.sha256()
        for _, content in _model_files(folder):
            digest.update(content)
        return "sha256:" + digest.hexdigest()
    try:
        cached = try_to_load_from_cache(name_or_path, "config.json")
    except HFValidationError:  # not a Hub name either: named as given
        return name_or_path
    if not isinstance(cached, str):
        return name_or_path
    # The cache holds snapshots/<commit>/config.json.
    files = {name: hashlib.sha256(content).hexdigest() for name, content in _model_files(Path(cached).parent)}
    return {"hub": name_or_path, "files": files}


def _model_files(folder: Path) -> Iterator[tuple[str, bytes]]:
    """The files of a model folder that make the model (see `model_identity`), each by its name and what is hashed of
    it."""
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if any(fnmatch.fnmatchcase(path.name, pattern) for pattern in _WHOLE_HASHED_FILES):
            yield path.name, f"{path.name}|".encode() + path.read_bytes() + b"\n"
        elif any(fnmatch.fnmatchcase(path.name, pattern) for pattern in WEIGHT_FILE_PATTERNS):
            content = sampled_sha256(path, header_bytes=_safetensors_header_bytes(path))
            yield path.name, f"{path.name}|{path.stat().st_size}|{content}\n".encode()


def same_model(recorded: Any, now: Any) -> bool | None:
    """
    Whether two model identities name the same model: True, False, or None where `recorded` (or `now`) is of a form
    that cannot tell (an earlier version's). The identities are `model_identity`'s, or, for LoRA adapters, `{"adapters":
    identity, "base": identity}` of the adapters and the base model they load into. Two Hub snapshots are the same
    model when each file both hold is unchanged: a file only one holds was not fetched into the other. An identity
    naming a Hub model by its name (`"name"`, `"name@commit"`: earlier versions) cannot tell about its files, nor a
    snapshot's identity against a folder's hash; nor a record of adapters alone about their base.
    """
    if recorded == now:
        return True
    if is_adapters_identity(recorded) and is_adapters_identity(now):
        verdicts = [same_model(recorded[part], now[part]) for part in ("adapters", "base")]
        return False if False in verdicts else None if None in verdicts else True
    if is_adapters_identity(now):  # an earlier version recorded the adapters alone: their base is unchecked
        return False if same_model(recorded, now["adapters"]) is False else None
    if is_adapters_identity(recorded):  # adapters then, a whole model now
        return False
    if is_hub_identity(recorded) and is_hub_identity(now):
        shared = recorded["files"].keys() & now["files"].keys()
        return all(recorded["files"][name] == now["files"][name] for name in shared)
    if isinstance(recorded, str) and isinstance(now, str) and recorded.startswith("sha256:"):
        return False if now.startswith("sha256:") else None
    names = [
        identity["hub"] if is_hub_identity(identity) else identity.split("@")[0]
        for identity in (recorded, now)
        if is_hub_identity(identity) or (isinstance(identity, str) and not identity.startswith("sha256:"))
    ]
    return False if len(set(names)) > 1 else None  # a Hub name (and commit) against what else names that model


def is_hub_identity(identity: Any) -> bool:
    """Whether a model identity is a Hub snapshot's (`model_identity`)."""
    return isinstance(identity, dict) and "hub" in identity


def is_adapters_identity(identity: Any) -> bool:
    """Whether a model identity is LoRA adapters' with their base's (see `same_model`)."""
    return isinstance(identity, dict) and "adapters" in identity


def _safetensors_header_bytes(path: Path) -> int:
    """The bytes of a safetensors file's header (an 8-byte length, then JSON naming each tensor's dtype, shape and
    offsets); 0 for another weight format."""
    if path.suffix != ".safetensors":
        return 0
    with open(path, "rb") as file:
        return 8 + min(int.from_bytes(file.read(8), "little"), _MAX_SAFETENSORS_HEADER)


def to_device_and_dtype(model, device=None, dtype=None):
    """`model.to` with only the arguments given: transformers refuses any `dtype` argument, even None, for a
    bitsandbytes model."""
    placement = {name: value for name, value in (("device", device), ("dtype", dtype)) if value is not None}
    return model.to(**placement) if placement else model


def load_clipcap(name_or_path: str, option: str = "--model"):
    """
    A saved ClipCap model and its processor, after [`check_clipcap_model`]; loaded with `trust_remote_code=False`, so
    no code from the folder runs and transformers never asks whether to run it.
    """
    check_clipcap_model(name_or_path, option)
    name_or_path = local_folder(name_or_path)
    model = ClipCapForConditionalGeneration.from_pretrained(name_or_path, trust_remote_code=False)
    with dropped_log_messages(_SLOW_IMAGE_PROCESSOR_NOTICE, _IMAGE_PROCESSOR_LOGGER):
        processor = ClipCapProcessor.from_pretrained(name_or_path, trust_remote_code=False)
    return model, processor

