"""Caption dataset loaders, and the checks that every image of a dataset opens.

Every loader returns a `datasets.Dataset` with one row per caption and the columns

- `image_id`: the dataset's id of the image (COCO's integer id, or the file name),
- `image_path`: the image file,
- `caption`: one caption (several captions of one image are several rows sharing `image_id` and `image_path`).
"""

from __future__ import annotations

import csv
import json
import os
import reprlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..image_processing_clipcap import load_image
from ..utils.bad_images import BadImagePolicy, check_bad_image_policy
from ..utils.file_utils import open_text, read_json

logger = logging.get_logger(__name__)

PathLike = str | os.PathLike

# Karpathy's split names -> ours; "restval" (the rest of COCO val2014) is training data, as in the paper.
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}


# ---------------------------------------------------------------------------------------------------------------------
# Loaders


class _CaptionRows:
    """Collects (image_id, image_path, caption) rows, rejecting empty captions with the record named."""

    def __init__(self, image_root: PathLike | None):
        self.image_root = Path(image_root) if image_root is not None else Path()
        self.columns: dict[str, list] = {"image_id": [], "image_path": [], "caption": []}

    def add(self, image_id: Any, file_name: str, caption: Any, record: str, **extra: Any) -> None:
        if not isinstance(caption, str):
            raise ValueError(
                f"{record} has the caption {reprlib.repr(caption)} ({type(caption).__name__}); a caption must be text "
                "(a string)."
            )
        if not caption.strip():
            raise ValueError(f"{record} has an empty caption ({caption!r}); every caption needs some text.")
        try:
            file_name.encode("utf-8")
        except UnicodeEncodeError:  # a JSON "\udcff" escape: the bytes of a file name that is not UTF-8
            record = record.encode("utf-8", "backslashreplace").decode("utf-8")
            raise ValueError(
                f"{record} names the file {file_name!r}, which is not valid Unicode (a lone surrogate, as a file name "
                "that is not UTF-8 gives); rename the image to a UTF-8 name and list that name."
            ) from None
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


class _ImageIds:
    """
    The `images` entries of a JSON annotation file by image id, each id checked as it is added: an integer or a
    string (not `true`), of the same kind as the first (Arrow keeps one type per column, and refuses a mix without
    naming the file or entry), and not an earlier entry's (two images under one id would share their references).
    """

    def __init__(self, path: PathLike, ids: str):
        self.path, self.ids = path, ids  # `ids`: what the file's ids are, as the mixed-kind error names them
        self.records: dict[int | str, dict] = {}
        self.positions: dict[int | str, int] = {}
        self.positional: set[int] = set()  # the entries whose id is their position

    def add(self, image_id: Any, index: int, key: str | None, record: dict) -> None:
        """Add entry `index`, whose id is its `key` field (None: the entry names none, and its position is its id)."""
        where = f"{self.path}: images[{index}]"
        if isinstance(image_id, bool) or not isinstance(image_id, (int, str)):
            raise ValueError(f"{where} has {key!r} = {reprlib.repr(image_id)}; expected int or str.")
        first_id = next(iter(self.records), None)  # images[0]'s
        if first_id is not None and isinstance(image_id, str) != isinstance(first_id, str):
            raise ValueError(
                f"{where} has the id {self._described(image_id, key is None)}, but images[0] has the id "
                f"{self._described(first_id, 0 in self.positional)}: {self.ids} must be all integers or all strings."
            )
        if image_id in self.records:
            earlier = self.positions[image_id]
            raise ValueError(
                f"{where} repeats the id {self._described(image_id, key is None, kind=False)} of images[{earlier}]"
                f"{' (its position there: it names no id)' if earlier in self.positional else ''}; every entry of "
                "`images` needs its own id (remove the duplicate, or give it an id of its own)."
            )
        self.records[image_id], self.positions[image_id] = record, index
        if key is None:
            self.positional.add(index)

    @staticmethod
    def _described(image_id: int | str, positional: bool, kind: bool = True) -> str:
        """An entry's id as an error names it: with its kind, and said to be its position where it names none."""
        notes = [{True: "a string", False: "an integer"}[isinstance(image_id, str)]] if kind else []
        notes += ["its position: it names no id"] if positional else []
        return f"{image_id!r}" + (f" ({'; '.join(notes)})" if notes else "")


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
    ids = _ImageIds(path, "the images' `cocoid` (or `imgid`)")
    for index, image in enumerate(images):
        where = f"{path}: images[{index}]"
        folder = _field(image, "filepath", where, str, default="")
        file_name = os.path.join(folder, _field(image, "filename", where, str))
        split = _field(image, "split", where, str)
        if split not in KARPATHY_SPLITS:
            raise ValueError(f"{where} ({file_name}) has split {split!r}; expected one of {sorted(KARPATHY_SPLITS)}.")
        key = next((key for key in ("cocoid", "imgid") if image.get(key) is not None), None)
        image_id = index if key is None else image[key]
        ids.add(image_id, index, key, image)
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
    images = _ImageIds(path, "the ids in `images` (and the `image_id` of each annotation)")
    for index, image in enumerate(_field(data, "images", str(path), list)):
        where = f"{path}: images[{index}]"
        images.add(_field(image, "id", where), index, "id", image)
        for name in extra_image_fields:  # nocaps' domain: a missing one would make a null domain of its own
            if not isinstance(image.get(name), str):
                found = f"has {name!r} = {reprlib.repr(image[name])}" if name in image else f"has no {name!r} field"
                raise ValueError(
                    f"{where} {found}; every image of this format needs its {name} (a string): add it, or read the "
                    f"file in the `coco` format, which keeps no {name}."
                )
    rows = _CaptionRows(image_root)
    for index, annotation in enumerate(_field(data, "annotations", str(path), list)):
        where = f"{path}: annotations[{index}]"
        image_id = _field(annotation, "image_id", where, (int, str))
        if isinstance(image_id, bool):  # an int to Python, which would match image 1 (or 0) or fail in Arrow
            raise ValueError(f"{where} has 'image_id' = {image_id!r}; expected int or str.")
        if image_id not in images.records:
            raise ValueError(f"{where} refers to image_id {image_id!r}, which is not listed in `images`.")
        image = images.records[image_id]
        file_name = _field(image, "file_name", f"{path}: image {image_id!r}", str)
        extra = {name: image[name] for name in extra_image_fields}
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
            # The reader's line (where the row ends), not a count of rows: a quoted caption may span lines, and blank
            # lines are skipped.
            reader = csv.DictReader(file)
            entries = [(f"{csv_path}: line {reader.line_num}", row) for row in reader]
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
        if texts == []:
            raise ValueError(
                f"{where} ({file_name}) has 'text' = [], no caption; give the image at least one caption, or leave it "
                "out of the metadata."
            )
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
    One row per image id (in order of first appearance) with all its captions in a `references` column; the other
    columns come from the image's first row. Used to caption each image once during evaluation, which scores each
    image id: two ids of one file (a dataset may list one picture twice) stay two images with their own references.
    An id naming two files is a `ValueError`.
    """
    first_row: dict[Any, int] = {}
    references: dict[Any, list[str]] = {}
    paths = dataset["image_path"]
    for row, (image_id, caption) in enumerate(zip(dataset["image_id"], dataset["caption"])):
        first = first_row.setdefault(image_id, row)
        if paths[row] != paths[first]:
            raise ValueError(
                f"The image id {image_id!r} names two files, {paths[first]} and {paths[row]}; an id must name one "
                "image: give each file its own id."
            )
        references.setdefault(image_id, []).append(caption)
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


def check_images(
    dataset: datasets.Dataset | datasets.DatasetDict, on_bad_image: BadImagePolicy = "error", num_workers: int = 0
) -> datasets.Dataset | datasets.DatasetDict:
    """
    Open every unique image once, before training from pixels: an unreadable image raises (naming the file and the
    record) or, with `on_bad_image="skip"`, its rows are dropped and counted.
    """
    check_bad_image_policy(on_bad_image)
    splits = _splits(dataset)
    keys = _image_keys(splits)
    unique = list(dict.fromkeys(key for split_keys in keys.values() for key in split_keys))
    loader = _image_file_loader(_ImageFiles(unique), batch_size=32, num_workers=num_workers)
    problems: dict[str, str] = {}
    for _, _, batch_problems in tqdm(loader, desc="Checking images", unit="batch"):
        problems.update({unique[index]: problem for index, problem in batch_problems.items()})
    _handle_bad_images(splits, keys, problems, on_bad_image)
    return _rebuild(dataset, splits)
