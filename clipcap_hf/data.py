"""Image-caption data for ClipCap training: dataset loaders, the CLIP embedding cache and the data collator.

Every loader returns a `datasets.Dataset` with one row per caption and the columns

- `image_id`: the dataset's id of the image (COCO's integer id, or the file name),
- `image_path`: the image file,
- `caption`: one caption (several captions of one image are several rows sharing `image_id` and `image_path`).

[`embed_images`] then computes the CLIP embedding of each unique image once, stores it in an Arrow cache keyed by a
fingerprint of the vision tower and the preprocessing, and adds an `image_index` column pointing into the embedding
table that [`ClipCapDataCollator`] hands to the model as `image_embeds`: training from the cache never runs the
vision tower.

Example:

```python
>>> from clipcap_hf.data import ClipCapDataCollator, embed_images, load_coco_karpathy
>>> splits = load_coco_karpathy("dataset_coco.json", image_root="coco/")
>>> train, train_embeds = embed_images(splits["train"], model, processor.image_processor, cache_dir="cache/")
>>> collator = ClipCapDataCollator(processor, image_embeds=train_embeds, max_caption_length=40)
```
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import reprlib
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from .file_utils import open_text, read_json, write_text_atomically
from .image_processing_clipcap import load_image
from .processing_clipcap import ClipCapProcessor

logger = logging.get_logger(__name__)

PathLike = str | os.PathLike
BadImagePolicy = Literal["error", "skip"]

# Karpathy's split names -> ours; "restval" (the rest of COCO val2014) is training data, as in the paper.
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}

EMBEDDING_CACHE_VERSION = 1
# Images per cache shard written during an embedding pass: an interrupted pass keeps all but the last few thousand.
EMBEDDING_SHARD_SIZE = 4096


# ---------------------------------------------------------------------------------------------------------------------
# Loaders


class _CaptionRows:
    """Collects (image_id, image_path, caption) rows, rejecting empty captions with the record named."""

    def __init__(self, image_root: PathLike | None):
        self.image_root = Path(image_root) if image_root is not None else Path()
        self.columns: dict[str, list] = {"image_id": [], "image_path": [], "caption": []}

    def add(self, image_id: Any, file_name: str, caption: Any, record: str, **extra: Any) -> None:
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{record} has an empty caption ({caption!r}); every caption needs some text.")
        self.columns["image_id"].append(image_id)
        self.columns["image_path"].append(str(self.image_root / file_name))
        self.columns["caption"].append(caption.strip())
        for key, value in extra.items():
            self.columns.setdefault(key, []).append(value)

    def to_dataset(self, source: PathLike) -> datasets.Dataset:
        if not self.columns["caption"]:
            raise ValueError(f"{source} holds no captions.")
        return datasets.Dataset.from_dict(self.columns)


_REQUIRED = object()


def _field(
    record: Any, key: str, where: str, kind: type | tuple[type, ...] = object, default: Any = _REQUIRED
) -> Any:
    """`record[key]` (or `default`) if it is a `kind`; else a ValueError naming the record (`where`) and the field."""
    if not isinstance(record, dict):
        raise ValueError(f"{where} is not an object (got {reprlib.repr(record)}).")
    if key not in record and default is _REQUIRED:
        raise ValueError(f"{where} has no {key!r} field.")
    value = record.get(key, default)
    if not isinstance(value, kind):
        names = " or ".join(kind_.__name__ for kind_ in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{where} has {key!r} = {reprlib.repr(value)}; expected {names}.")
    return value


def load_coco_karpathy(path: PathLike, image_root: PathLike) -> datasets.DatasetDict:
    """
    The Karpathy split of COCO (`dataset_coco.json`; Flickr8k/30k files of the same layout work too).

    Args:
        path: the Karpathy JSON file: `{"images": [{"filepath", "filename", "split", "cocoid", "sentences":
            [{"raw"}]}]}`.
        image_root: the folder holding `train2014/` and `val2014/` (each image is `image_root/filepath/filename`).

    Returns:
        A `DatasetDict` with `train` (Karpathy's train + restval, as the paper trains), `validation` and `test`.
    """
    images = _field(read_json(path), "images", str(path), list)
    rows = {name: _CaptionRows(image_root) for name in ("train", "validation", "test")}
    for index, image in enumerate(images):
        where = f"{path}: images[{index}]"
        folder = _field(image, "filepath", where, str, default="")
        file_name = os.path.join(folder, _field(image, "filename", where, str))
        split = _field(image, "split", where, str)
        if split not in KARPATHY_SPLITS:
            raise ValueError(f"{where} ({file_name}) has split {split!r}; expected one of {sorted(KARPATHY_SPLITS)}.")
        image_id = image.get("cocoid", image.get("imgid", index))
        for number, sentence in enumerate(_field(image, "sentences", where, list)):
            record = f"{where} ({file_name}) sentences[{number}]"
            rows[KARPATHY_SPLITS[split]].add(image_id, file_name, _field(sentence, "raw", record), record)
    return datasets.DatasetDict(
        {
            name: split_rows.to_dataset(f"{path} ({name})")
            for name, split_rows in rows.items()
            if split_rows.columns["caption"]
        }
    )


def load_coco_captions(
    path: PathLike, image_root: PathLike, extra_image_fields: Sequence[str] = ()
) -> datasets.Dataset:
    """
    A COCO captions annotation file (`captions_train2014.json`, `captions_val2017.json`, ...).

    Args:
        path: the annotation file (`{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}`).
        image_root: the folder holding the images (`file_name` is relative to it).
        extra_image_fields: fields of the `images` entries to keep as columns (e.g. nocaps' `"domain"`).
    """
    data = read_json(path)
    images = {}
    for index, image in enumerate(_field(data, "images", str(path), list)):
        images[_field(image, "id", f"{path}: images[{index}]", (int, str))] = image
    rows = _CaptionRows(image_root)
    for index, annotation in enumerate(_field(data, "annotations", str(path), list)):
        where = f"{path}: annotations[{index}]"
        image_id = _field(annotation, "image_id", where, (int, str))
        if image_id not in images:
            raise ValueError(f"{where} refers to image_id {image_id!r}, which is not listed in `images`.")
        image = images[image_id]
        file_name = _field(image, "file_name", f"{path}: image {image_id!r}", str)
        extra = {name: image.get(name) for name in extra_image_fields}
        rows.add(image_id, file_name, annotation.get("caption"), f"{where} (image {file_name})", **extra)
    return rows.to_dataset(path)


def load_nocaps(path: PathLike, image_root: PathLike) -> datasets.Dataset:
    """
    The nocaps validation annotations (`nocaps_val_4500_captions.json`, COCO layout); keeps each image's `domain`
    (`in-domain`, `near-domain`, `out-domain`) for per-domain scores.
    """
    return load_coco_captions(path, image_root, extra_image_fields=("domain",))


def load_conceptual_captions(path: PathLike, image_root: PathLike) -> datasets.Dataset:
    """
    Conceptual Captions as a TSV of `caption<TAB>image file` rows, the files relative to `image_root`.

    The official TSVs list image URLs; download the images first (for example with img2dataset) and write the local
    file names in the second column. A first row reading `caption<TAB>image` (or `file_name`) is a header.
    """
    rows = _CaptionRows(image_root)
    with open_text(path, newline="") as file:
        for number, row in enumerate(csv.reader(file, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            where = f"{path}: line {number}"
            if number == 1 and [value.strip().lower() for value in row[:2]] in (
                ["caption", "image"],
                ["caption", "file_name"],
            ):
                continue
            if len(row) < 2:
                raise ValueError(f"{where} has {len(row)} column(s); expected `caption<TAB>image file`.")
            caption, file_name = row[0], row[1].strip()
            if file_name.startswith(("http://", "https://")):
                raise ValueError(
                    f"{where} gives an image URL ({file_name}); download the images first and list their local file "
                    "names (relative to the image folder) in the second column."
                )
            rows.add(file_name, file_name, caption, f"{where} ({file_name})")
    return rows.to_dataset(path)


def load_image_folder(folder: PathLike) -> datasets.Dataset:
    """
    A folder of images with a `metadata.jsonl` or `metadata.csv` (the `datasets` imagefolder layout) whose rows give
    `file_name` (relative to the folder) and `text`: one caption, or a list of captions in JSON Lines.
    """
    folder = Path(folder)
    jsonl, csv_path = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.exists():
        with open_text(jsonl) as file:
            records = [(f"{jsonl}: line {n}", line) for n, line in enumerate(file, start=1) if line.strip()]
        entries = []
        for where, line in records:
            try:
                entries.append((where, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON: {error}") from error
    elif csv_path.exists():
        with open_text(csv_path, newline="") as file:
            entries = [(f"{csv_path}: line {n}", row) for n, row in enumerate(csv.DictReader(file), start=2)]
        for where, row in entries:
            # DictReader puts the fields beyond the header under the key None: an unquoted comma in a caption.
            if None in row:
                raise ValueError(
                    f"{where} has {len(row) - 1 + len(row[None])} fields but the header names {len(row) - 1}; "
                    "put a caption that contains a comma in double quotes (\"A dog, running.\")."
                )
    else:
        raise FileNotFoundError(f"{folder} has no metadata.jsonl or metadata.csv (rows of file_name and text).")
    rows = _CaptionRows(folder)
    for where, entry in entries:
        file_name = _field(entry, "file_name", where, str)
        texts = _field(entry, "text", where)
        for number, text in enumerate(texts if isinstance(texts, list) else [texts]):
            record = f"{where} ({file_name})" + (f" text[{number}]" if isinstance(texts, list) else "")
            rows.add(file_name, file_name, text, record)
    return rows.to_dataset(jsonl if jsonl.exists() else csv_path)


DATASET_FORMATS = {
    "coco-karpathy": load_coco_karpathy,
    "coco": load_coco_captions,
    "conceptual-captions": load_conceptual_captions,
    "nocaps": load_nocaps,
    "imagefolder": load_image_folder,
}


def load_caption_dataset(
    dataset_format: str, path: PathLike, image_root: PathLike | None = None
) -> datasets.Dataset | datasets.DatasetDict:
    """
    Load captions in one of [`DATASET_FORMATS`]: `coco-karpathy` (a `DatasetDict` of train/validation/test), `coco`,
    `conceptual-captions`, `nocaps` (each one `Dataset`) or `imagefolder` (`path` is the folder).
    """
    if dataset_format not in DATASET_FORMATS:
        raise ValueError(f"Unknown dataset format {dataset_format!r}; expected one of {sorted(DATASET_FORMATS)}.")
    if dataset_format == "imagefolder":
        return load_image_folder(path)
    if image_root is None:
        raise ValueError(f"The {dataset_format!r} format needs the folder holding the images (`image_root`).")
    return DATASET_FORMATS[dataset_format](path, image_root)


def group_by_image(dataset: datasets.Dataset) -> datasets.Dataset:
    """
    One row per unique image (in order of first appearance) with all its captions in a `references` column; the
    other columns come from the image's first row. Used to caption each image once during evaluation.
    """
    first_row: dict[Any, int] = {}
    references: dict[Any, list[str]] = {}
    for row, (image_path, caption) in enumerate(zip(dataset["image_path"], dataset["caption"])):
        first_row.setdefault(image_path, row)
        references.setdefault(image_path, []).append(caption)
    unique = dataset.select(list(first_row.values())).remove_columns("caption")
    return unique.add_column("references", list(references.values()))


# ---------------------------------------------------------------------------------------------------------------------
# Reading images


class _ImageFiles(torch.utils.data.Dataset):
    """Unique image files, preprocessed in DataLoader workers; a file that cannot be read yields its error."""

    def __init__(self, paths: Sequence[str], image_processor=None):
        self.paths = paths
        self.image_processor = image_processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, Any, str | None]:
        try:
            image = load_image(self.paths[index])
            pixels = (
                self.image_processor(image, return_tensors="pt")["pixel_values"][0] if self.image_processor else None
            )
            return index, pixels, None
        except Exception as error:  # any decoding or preprocessing failure is reported with the file named
            cause = error.__cause__ or error  # load_image wraps PIL's error
            problem = "file not found" if isinstance(cause, FileNotFoundError) else f"{type(cause).__name__}: {cause}"
            return index, None, problem


def _collate_image_files(items: list[tuple[int, Any, str | None]]) -> tuple[list[int], Any, dict[int, str]]:
    good = [(index, pixels) for index, pixels, problem in items if problem is None]
    problems = {index: problem for index, _, problem in items if problem is not None}
    pixels = torch.stack([pixels for _, pixels in good]) if good and good[0][1] is not None else None
    return [index for index, _ in good], pixels, problems


def _image_file_loader(files: _ImageFiles, batch_size: int, num_workers: int) -> torch.utils.data.DataLoader:
    """Batches of `(indices, pixel_values, problems)` over `files`, read in `num_workers` workers."""
    return torch.utils.data.DataLoader(
        files,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate_image_files,
        # A loader draws a seed for its workers from its generator; a private one leaves the global random state
        # alone, so what a run draws after reading the images (LoRA's initial weights) does not depend on whether
        # the embedding cache already held them.
        generator=torch.Generator(),
    )


def _splits(dataset: datasets.Dataset | datasets.DatasetDict) -> dict[str, datasets.Dataset]:
    return dict(dataset) if isinstance(dataset, datasets.DatasetDict) else {"": dataset}


def _rebuild(original: datasets.Dataset | datasets.DatasetDict, splits: dict[str, datasets.Dataset]):
    return datasets.DatasetDict(splits) if isinstance(original, datasets.DatasetDict) else splits[""]


def _image_keys(splits: dict[str, datasets.Dataset]) -> dict[str, list[str]]:
    """Each row's image as an absolute path: the key of the image checks (the cache adds size and time to it)."""
    return {name: [os.path.abspath(path) for path in split["image_path"]] for name, split in splits.items()}


def _handle_bad_images(
    splits: dict[str, datasets.Dataset],
    keys: dict[str, list[str]],
    problems: dict[str, str],
    on_bad_image: BadImagePolicy,
) -> None:
    """Raise naming the unreadable files and the first record of each, or drop their rows (in place) and count them."""
    if not problems:
        return
    records: dict[str, str] = {}
    for name, split in splits.items():
        for row, (key, image_id) in enumerate(zip(keys[name], split["image_id"])):
            if key in problems:
                records.setdefault(key, f"{name + ' ' if name else ''}row {row}, image_id {image_id!r}")
    lines = [f"  {path}: {problem} (record: {records[path]})" for path, problem in list(problems.items())[:10]]
    report = "\n".join(lines) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
    if on_bad_image == "error":
        raise ValueError(
            f"{len(problems)} image(s) cannot be read; nothing was trained. Fix or remove them, or skip them "
            f"(on_bad_image='skip', `--on_bad_image skip`):\n{report}"
        )
    dropped = 0
    for name, split in splits.items():
        keep = [row for row, key in enumerate(keys[name]) if key not in problems]
        dropped += len(keys[name]) - len(keep)
        splits[name], keys[name] = split.select(keep), [keys[name][row] for row in keep]
    logger.warning(f"Skipped {len(problems)} unreadable image(s) and their {dropped} caption(s):\n{report}")


def _check_policy(on_bad_image: str) -> None:
    if on_bad_image not in ("error", "skip"):
        raise ValueError(f"on_bad_image (`--on_bad_image`) must be 'error' or 'skip', got {on_bad_image!r}.")


def check_images(
    dataset: datasets.Dataset | datasets.DatasetDict, on_bad_image: BadImagePolicy = "error", num_workers: int = 0
) -> datasets.Dataset | datasets.DatasetDict:
    """
    Open every unique image once, before training from pixels: an unreadable image raises (naming the file and the
    record) or, with `on_bad_image="skip"`, its rows are dropped and counted.
    """
    _check_policy(on_bad_image)
    splits = _splits(dataset)
    keys = _image_keys(splits)
    unique = list(dict.fromkeys(key for split_keys in keys.values() for key in split_keys))
    loader = _image_file_loader(_ImageFiles(unique), batch_size=32, num_workers=num_workers)
    problems: dict[str, str] = {}
    for _, _, batch_problems in tqdm(loader, desc="Checking images", unit="batch"):
        problems.update({unique[index]: problem for index, problem in batch_problems.items()})
    _handle_bad_images(splits, keys, problems, on_bad_image)
    return _rebuild(dataset, splits)


# ---------------------------------------------------------------------------------------------------------------------
# Embedding cache


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
        model: a [`ClipCapForConditionalGeneration`] (its `vision_model` and `get_image_features` are used).
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
                    chunks.append(self.model.get_image_features(pixel_values).float().cpu())
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


# ---------------------------------------------------------------------------------------------------------------------
# Collator


@dataclass
class ClipCapDataCollator:
    r"""
    Turns caption rows into a training batch for [`ClipCapForConditionalGeneration`].

    Captions are tokenized by [`ClipCapProcessor.tokenize_captions`]: the tokenizer's EOS is appended (so a trained
    model stops by itself), the batch is right-padded to its longest caption only, `labels` are -100 on padding
    (the model adds -100 for the prefix), and captions longer than `max_caption_length` tokens are cut (see
    [`add_caption_lengths`] to count them). A tokenizer without a padding token pads with EOS; padded positions are
    masked either way.

    The image comes from, in this order: `image_index` into `image_embeds` (the embedding cache: no vision
    forward), a preprocessed `pixel_values` column, an `image` column (PIL images, e.g. a `datasets.Image` feature),
    or `image_path` (files opened here).

    Args:
        processor: the model's processor.
        image_embeds: the embedding table from [`embed_images`].
        max_caption_length: the most caption tokens kept, EOS included.
    """

    processor: ClipCapProcessor
    image_embeds: torch.Tensor | None = None
    max_caption_length: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.processor.tokenize_captions(
            [feature["caption"] for feature in features], max_length=self.max_caption_length
        )
        batch.pop("num_truncated")  # a count, not a model input; add_caption_lengths counts the whole dataset
        batch.update(image_inputs(features, self.processor.image_processor, self.image_embeds))
        return batch


def image_inputs(
    features: Sequence[dict[str, Any]], image_processor, image_embeds: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """
    The model's image input for a list of rows: `image_embeds` looked up by `image_index` when an embedding table
    is given, else `pixel_values` from a preprocessed `pixel_values` column, an `image` column or `image_path` files.
    """
    if image_embeds is not None:
        return {"image_embeds": image_embeds[torch.tensor([int(feature["image_index"]) for feature in features])]}
    if features[0].get("pixel_values") is not None:
        return {"pixel_values": torch.stack([torch.as_tensor(feature["pixel_values"]) for feature in features])}
    images = []
    for feature in features:
        if feature.get("image") is not None:
            images.append(feature["image"])
        elif feature.get("image_path") is not None:
            images.append(load_image(feature["image_path"]))
        else:
            raise ValueError(
                "A row has no image: give `image_embeds` (rows with `image_index`), or rows with `pixel_values`, an "
                f"`image` or an `image_path`. Got columns {sorted(feature)}."
            )
    return {"pixel_values": image_processor(images, return_tensors="pt")["pixel_values"]}


def add_caption_lengths(
    dataset: datasets.Dataset, processor: ClipCapProcessor, max_length: int | None = None, batch_size: int = 1000
) -> tuple[datasets.Dataset, int]:
    """
    Add a `length` column, each caption's token count as the collator gives it (EOS included, at most `max_length`),
    which `TrainingArguments(group_by_length=True)` uses to batch captions of similar length. Also returns how many
    captions the collator will cut to `max_length`.
    """
    lengths: list[int] = []
    num_truncated = 0
    for rows in dataset.select_columns("caption").iter(batch_size=batch_size):
        encoded = processor.tokenize_captions(rows["caption"], max_length=max_length, return_tensors=None)
        lengths.extend(sum(mask) for mask in encoded["attention_mask"])
        num_truncated += encoded["num_truncated"]
    if "length" in dataset.column_names:
        dataset = dataset.remove_columns("length")
    return dataset.add_column("length", lengths), num_truncated


__all__ = [
    "ClipCapDataCollator",
    "DATASET_FORMATS",
    "ImageEmbeddingCache",
    "add_caption_lengths",
    "check_images",
    "embed_images",
    "group_by_image",
    "image_cache_key",
    "image_inputs",
    "load_caption_dataset",
    "load_coco_captions",
    "load_coco_karpathy",
    "load_conceptual_captions",
    "load_image_folder",
    "load_nocaps",
    "vision_fingerprint",
]
