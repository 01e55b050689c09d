"""The CLIP embedding cache: each unique image's embedding computed once and stored on disk.

[`embed_images`] computes the CLIP embedding of each unique image of a caption dataset once, stores it in an Arrow
cache keyed by a fingerprint of the vision tower and the preprocessing, and adds an `image_index` column pointing into
the embedding table that [`ClipCapDataCollator`] hands to the model as `image_embeds`: training from the cache never
runs the vision tower.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..utils.file_utils import read_json, write_text_atomically
from .loaders import (
    BadImagePolicy,
    PathLike,
    _check_policy,
    _handle_bad_images,
    _image_file_loader,
    _image_keys,
    _ImageFiles,
    _rebuild,
    _splits,
)

logger = logging.get_logger(__name__)

EMBEDDING_CACHE_VERSION = 1
# Images per cache shard written during an embedding pass: an interrupted pass keeps all but the last few thousand.
EMBEDDING_SHARD_SIZE = 4096


def vision_fingerprint(vision_model: torch.nn.Module, image_processor) -> str:
    """
    A hash of everything that determines an image's embedding: the vision tower's weights (names, dtypes, values) and
    the image processor's settings. Any change gives another fingerprint, hence another cache.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(vision_model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    # Only preprocessing settings: save_pretrained adds `auto_map` (and transformers 4 `_processor_class`), which
    # would otherwise give a saved and reloaded processor another fingerprint and recompute the whole cache.
    settings = {
        key: value
        for key, value in image_processor.to_dict().items()
        if "processor_class" not in key and key != "auto_map"
    }
    digest.update(type(image_processor).__name__.encode())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


class ImageEmbeddingCache:
    r"""
    CLIP image embeddings on disk, one per image file, for one vision tower and preprocessing.

    Layout: `cache_dir/<fingerprint[:16]>/` holds `cache_info.json` (the full fingerprint and what it describes) and
    Arrow shards (`shard-<uuid>/`, written with `Dataset.save_to_disk`) of `image_key` (see [`image_cache_key`]) and
    `image_embeds`. Another vision tower or preprocessing gets another folder, so its embeddings are computed afresh;
    a folder whose `cache_info.json` names another fingerprint is refused, never reused. Shards are written under a
    temporary name and renamed when complete, so an interrupted write or a concurrent process leaves no broken shard.

    Args:
        cache_dir: the root folder of the caches, or one cache folder (it then must match this model).
        model: a [`ClipCapForConditionalGeneration`] (its `vision_model` and `get_image_embeds` are used).
        image_processor: the preprocessing the embeddings are computed with.
    """

    def __init__(self, cache_dir: PathLike, model, image_processor):
        self.model = model
        self.image_processor = image_processor
        self.fingerprint = vision_fingerprint(model.vision_model, image_processor)
        cache_dir = Path(cache_dir)
        # A folder that is itself a cache (it has cache_info.json) is used as is, after checking its fingerprint.
        self.directory = cache_dir if (cache_dir / "cache_info.json").exists() else cache_dir / self.fingerprint[:16]
        self._check_info()
        # Embeddings that could not be written (a read-only folder): kept for this run rather than thrown away.
        self._unsaved: list[tuple[list[str], torch.Tensor]] = []

    @property
    def info_path(self) -> Path:
        return self.directory / "cache_info.json"

    def _check_info(self) -> None:
        if not self.info_path.exists():
            return
        info = read_json(self.info_path)
        if info.get("fingerprint") != self.fingerprint or info.get("version") != EMBEDDING_CACHE_VERSION:
            raise ValueError(
                f"The embedding cache in {self.directory} was computed with another vision tower or image "
                f"preprocessing (fingerprint {str(info.get('fingerprint'))[:16]}, this model's is "
                f"{self.fingerprint[:16]}). Point the cache at its parent folder to get one for this model, or "
                "delete the folder."
            )

    def load(self) -> tuple[dict[str, int], torch.Tensor | None]:
        """The cached images (key -> row) and their embeddings, `(num_images, dim)` float32."""
        # Shards still being written (or left by a killed run) have a temporary name and are not matched here.
        shards = sorted(self.directory.glob("shard-*"))
        keys: list[str] = []
        tables: list[torch.Tensor] = []
        if shards:
            columns = datasets.concatenate_datasets([_load_shard(shard) for shard in shards]).with_format("numpy")[:]
            keys.extend(columns["image_key"].tolist())
            tables.append(torch.from_numpy(columns["image_embeds"]))
        for unsaved_keys, embeddings in self._unsaved:
            keys.extend(unsaved_keys)
            tables.append(embeddings)
        if not tables:
            return {}, None
        return {key: row for row, key in enumerate(keys)}, torch.cat(tables)

    def _write_info(self, dim: int) -> None:
        info = {
            "version": EMBEDDING_CACHE_VERSION,
            "fingerprint": self.fingerprint,
            "vision_model": type(self.model.vision_model).__name__,
            "vision_config": getattr(getattr(self.model.vision_model, "config", None), "to_dict", dict)(),
            "image_processor": self.image_processor.to_dict(),
            "embedding_dim": dim,
        }
        # Written whole, so that a concurrent run never reads half of it.
        write_text_atomically(self.info_path, json.dumps(info, indent=2, sort_keys=True, default=str))

    def add(self, keys: list[str], embeddings: torch.Tensor) -> None:
        """Store the embeddings of new images as one more shard."""
        if not keys:
            return
        features = datasets.Features(
            {
                "image_key": datasets.Value("string"),
                "image_embeds": datasets.Sequence(datasets.Value("float32"), length=embeddings.shape[1]),
            }
        )
        shard = datasets.Dataset.from_dict(
            {"image_key": keys, "image_embeds": embeddings.float().numpy()}, features=features
        )
        # A unique name, so that concurrent runs never write the same shard; complete once renamed into place.
        name = uuid.uuid4().hex
        temporary = self.directory / f".tmp-{name}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            try:
                shard.save_to_disk(str(temporary))
                os.replace(temporary, self.directory / f"shard-{name}")
            finally:
                shutil.rmtree(temporary, ignore_errors=True)
            self._write_info(embeddings.shape[1])
        except OSError as error:
            if not self._unsaved:
                logger.warning(
                    f"Cannot write to the embedding cache {self.directory} ({type(error).__name__}: {error}); this "
                    "run keeps the embeddings in memory and the next one computes them again. Give a writable "
                    "cache folder (--embedding_cache_dir) to keep them."
                )
            self._unsaved.append((list(keys), embeddings.float().cpu()))

    @torch.no_grad()
    def compute(
        self,
        paths: list[str],
        keys: list[str],
        batch_size: int = 64,
        device: str | torch.device | None = None,
        num_workers: int = 0,
    ) -> dict[str, str]:
        """
        Embed image files in batches (on `device`: the model's vision tower is moved there) and store them under
        `keys`; returns the files that could not be read, with the reason. The readable ones are stored even when some
        fail, every [`EMBEDDING_SHARD_SIZE`] images and when an error interrupts the pass, so a rerun embeds only
        the rest.
        """
        if not paths:
            return {}
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.vision_model.to(device).eval()
        loader = _image_file_loader(_ImageFiles(paths, self.image_processor), batch_size, num_workers)
        done_keys: list[str] = []
        chunks: list[torch.Tensor] = []
        problems: dict[str, str] = {}

        def store() -> None:
            if chunks:
                self.add(done_keys, torch.cat(chunks))
                done_keys.clear()
                chunks.clear()

        progress = tqdm(total=len(paths), desc="Embedding images", unit="image")
        try:
            for indices, pixel_values, batch_problems in loader:
                problems.update({paths[index]: problem for index, problem in batch_problems.items()})
                if indices:
                    pixel_values = pixel_values.to(device, self.model.vision_model.dtype)
                    chunks.append(self.model.get_image_embeds(pixel_values).float().cpu())
                    done_keys.extend(keys[index] for index in indices)
                progress.update(len(indices) + len(batch_problems))
                if len(done_keys) >= EMBEDDING_SHARD_SIZE:
                    store()
        finally:  # also on an error or Ctrl-C: what was embedded is kept
            progress.close()
            store()
        return problems


def image_cache_key(path: str) -> str:
    """
    The embedding cache's key of an image file: its absolute path, size and modification time (in nanoseconds), so
    that a file replaced at the same path is embedded again, without hashing the content of every file.
    """
    try:
        stat = os.stat(path)
    except OSError:  # a missing file fails to load and is reported; its key only needs to be stable
        return path
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def _load_shard(shard: Path) -> datasets.Dataset:
    try:
        return datasets.load_from_disk(str(shard))
    except (OSError, ValueError) as error:  # a shard written in place (older versions) by a run that was stopped
        raise ValueError(
            f"The embedding cache shard {shard} is incomplete or damaged ({type(error).__name__}: {error}). Delete "
            "that folder; its images are embedded again on the next run."
        ) from error


def embed_images(
    dataset: datasets.Dataset | datasets.DatasetDict,
    model,
    image_processor,
    cache_dir: PathLike,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    on_bad_image: BadImagePolicy = "error",
) -> tuple[datasets.Dataset | datasets.DatasetDict, torch.Tensor]:
    """
    Give every row of a caption dataset the CLIP embedding of its image, computing each unique image once.

    Embeddings already in the cache (same vision tower and preprocessing, see [`ImageEmbeddingCache`]) are reused;
    the others are computed in batches with a progress bar and added to it.

    Args:
        dataset: rows with `image_path` and `image_id` (from one of the loaders); a `DatasetDict`'s splits share
            one embedding table.
        model: the [`ClipCapForConditionalGeneration`] whose vision tower embeds the images.
        image_processor: its image processor.
        cache_dir: where the embedding caches live.
        batch_size: images per vision forward.
        device: where the vision tower runs; CUDA when available by default.
        num_workers: DataLoader workers that decode and preprocess images.
        on_bad_image: a missing or unreadable image raises a `ValueError` naming the files and records (`"error"`),
            or drops its rows with a warning that counts them (`"skip"`). Either way the readable images' embeddings
            are cached first, so a rerun loses no work.

    Returns:
        `(dataset, image_embeds)`: the dataset with an `image_index` column (rows of skipped images removed), and
        the `(num_unique_images, dim)` float32 embeddings it indexes, for [`ClipCapDataCollator`].
    """
    _check_policy(on_bad_image)
    splits = _splits(dataset)
    keys = _image_keys(splits)
    cache = ImageEmbeddingCache(cache_dir, model, image_processor)
    cache_keys = {path: image_cache_key(path) for split_keys in keys.values() for path in split_keys}
    cached, _ = cache.load()
    missing = [path for path, key in cache_keys.items() if key not in cached]
    if missing:
        logger.info(f"Embedding {len(missing)} image(s) not yet in the cache {cache.directory}.")
    problems = cache.compute(
        missing, [cache_keys[path] for path in missing], batch_size=batch_size, device=device, num_workers=num_workers
    )
    _handle_bad_images(splits, keys, problems, on_bad_image)

    unique = list(dict.fromkeys(k for split_keys in keys.values() for k in split_keys))
    if not unique:
        raise ValueError("None of the images could be read; there is nothing to train on.")
    cached, embeddings = cache.load()
    position = {key: index for index, key in enumerate(unique)}
    table = embeddings[torch.tensor([cached[cache_keys[path]] for path in unique], dtype=torch.long)]
    for name, split in splits.items():
        if "image_index" in split.column_names:
            split = split.remove_columns("image_index")
        splits[name] = split.add_column("image_index", [position[key] for key in keys[name]])
    return _rebuild(dataset, splits), table
