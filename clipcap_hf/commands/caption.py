"""`clipcap caption`: caption image files (printing the captions), or a dataset or embeddings folder into parquet
shards (`--output`), resumably and split between the processes of `torchrun`/`accelerate launch`.

Image files need neither `datasets` nor `evaluate`; datasets and embeddings folders need `datasets`.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence

import torch

from ..evaluation import UnreadableImagesError, iter_captions
from ..evaluation.gallery import GalleryRecord, write_gallery
from ..inference.captioner import check_decoding_options
from ..inference.sharded import RUN_FILE, shard_file_name
from ..utils.file_utils import check_output_folder, check_output_outside_inputs, escape_controls
from ..utils.loading import check_caption_fits_positions, check_clip_model, check_clipcap_model
from ._utils import (
    TORCH_DTYPES,
    add_caption_options,
    add_sampling_options,
    check_gallery_path,
    decoding_kwargs,
    expand_image_paths,
    load_model_and_processor,
    positive_int,
    resolve_device,
    stdout_is_utf8,
    torch_dtype,
)

# The caption formats `load_image_source` reads (clipcap_hf.data.DATASET_FORMATS), listed here so that `clipcap
# caption --help` does not import datasets.
DATASET_FORMATS = ("coco-karpathy", "coco", "conceptual-captions", "nocaps", "imagefolder")
DEFAULT_SPLIT = "train"
# The options that only a dataset source (--dataset-name, --data-files) reads. They default to None, so that one given
# with image files or --embeddings is refused instead of ignored; `_caption_dataset` then gives them their defaults.
DATASET_OPTIONS = ("dataset_config_name", "dataset_format", "image_root", "split", "image_column", "streaming")
# The source's settings that caption_run.json records, and those of them that name local files or folders.
_SOURCE_SETTINGS = ("dataset_name", "dataset_config_name", "data_files", "dataset_format", "image_root", "split",
                   "image_column", "streaming", "embeddings")
_SOURCE_PATHS = ("dataset_name", "data_files", "image_root", "embeddings")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", help="Image files, folders of images, or glob patterns.")
    parser.add_argument("--model", required=True, help="A ClipCap folder or Hub name.")
    add_caption_options(parser, batch_size=16)
    add_sampling_options(parser)
    parser.add_argument("--num-return-sequences", type=positive_int, default=1,
                        help="Captions per image (default: 1); needs --do-sample or at least as many --num-beams.")
    parser.add_argument("--num-candidates", type=positive_int, default=1,
                        help="Generate N candidate captions per image (with --do-sample or --num-beams N or more) and "
                             "keep the one --rerank-model scores highest, saving its CLIPScore.")
    parser.add_argument("--rerank-model", default=None,
                        help="The CLIP model (a transformers CLIPModel folder or Hub name) that chooses among "
                             "--num-candidates captions.")
    parser.add_argument("--seed", type=int, default=None,
                        help="With --do-sample: the same seed gives the same captions; with --output each "
                             "shard is seeded with SEED + its index, so a resumed run gives those of a whole one "
                             "(with the same --batch-size and device, which the run records).")
    parser.add_argument("--device", default=None,
                        help="Default: cuda when available, else cpu. Under torchrun, cuda (given or by default) is "
                             "each process's own GPU.")
    parser.add_argument("--dtype", type=torch_dtype, default=None, metavar="{" + ",".join(TORCH_DTYPES) + "}",
                        help="Run the model in this precision (default: as saved).")
    parser.add_argument("--json", action="store_true",
                        help="Print a JSON list of {image, caption}, one per image in order; an image that cannot "
                             "be read has caption null and an error.")
    parser.add_argument("--gallery", default=None, help="Also write an HTML page of the images and their captions.")

    sources = parser.add_argument_group(
        "datasets (instead of image files; with --output)",
        "The sources `clipcap train` reads, or an embeddings folder from `clipcap embed`.",
    )
    sources.add_argument("--dataset-name", default=None, help="A Hub dataset name (or local dataset folder).")
    sources.add_argument("--dataset-config-name", default=None, help="Its configuration.")
    sources.add_argument("--data-files", nargs="+", default=None,
                         help="Data files or one folder: webdataset .tar shards, .parquet, .jsonl/.csv (image paths), "
                              "a save_to_disk folder or an image folder.")
    sources.add_argument("--dataset-format", choices=DATASET_FORMATS, default=None,
                         help="Read --data-files as this caption format's annotation file (or folder).")
    sources.add_argument("--image-root", default=None,
                         help="The folder the image paths of --data-files are relative to.")
    sources.add_argument("--split", default=None, help=f"The split to caption (default: {DEFAULT_SPLIT}).")
    sources.add_argument("--image-column", default=None,
                         help="The column holding the images (default: image, or the source's first image column).")
    sources.add_argument("--streaming", action="store_true", default=None,
                         help="Read the source lazily; each data file is then one input shard.")
    sources.add_argument("--embeddings", default=None,
                         help="An embeddings folder written by `clipcap embed`: no vision tower runs.")
    sources.add_argument("--output", default=None,
                         help="Write parquet shards here (image_key, caption, and candidates, clip_score when asked): "
                              "one per input shard, each whole; a rerun skips finished shards.")
    sources.add_argument("--shard-size", type=positive_int, default=None,
                         help="Rows per input shard of a dataset that is not streamed (default: 10000).")
    sources.add_argument("--on-bad-image", choices=("error", "skip"), default="error",
                         help="An unreadable image stops the run, naming its shard and key (error, the default; "
                              "finished shards stay), or is left out and counted (skip). With image files: each "
                              "unreadable file is named at the end and the status is 2 (error), or it is left out of "
                              "the captions, --json and --gallery, named in a warning, with status 0 (skip). With "
                              "skip, a run that can read none of its images, leaving no caption at all, fails (status "
                              "2) naming them.")


def _dataset_source(args: argparse.Namespace) -> bool:
    """Whether the command reads a dataset or embeddings folder (else image files); checks that exactly one kind
    of source is given, with only the options that apply to it, and that --output goes with it."""
    dataset = args.dataset_name is not None or args.data_files is not None
    given = [kind for kind, present in (("image files", bool(args.images)), ("--dataset-name/--data-files", dataset),
                                        ("--embeddings", args.embeddings is not None)) if present]
    if len(given) != 1:
        raise ValueError(f"Give one source: image files, --dataset-name or --data-files, or --embeddings"
                         f"{'; got ' + ' and '.join(given) if given else ''}.")
    if not dataset:
        _refuse_dataset_options(args)
    if args.images:
        if args.shard_size is not None:
            raise ValueError("--shard-size splits a dataset or embeddings folder (with --output), not image files: "
                             "they are captioned as given. Leave it out.")
        if args.output is not None:
            raise ValueError("--output writes the captions of a dataset: give an image folder as --data-files FOLDER.")
        return False
    if args.output is None:
        raise ValueError("Captioning a dataset or embeddings folder writes parquet shards: give --output DIR.")
    if args.json or args.gallery:
        raise ValueError("--json and --gallery print or show image files' captions; with --output the captions go "
                         "into the parquet shards.")
    check_output_folder(args.output, "--output", "write the caption shards to")
    if args.data_files is None:
        _check_output_outside_source(args)
    else:
        from ..data.prepare import data_file_patterns, expand_data_files

        # Quoted glob patterns and comma-separated files, as `clipcap train` reads them; the files they name are what
        # caption_run.json records, as when the shell expands the patterns. Checked as given first, for the folders
        # a pattern may read on a rerun (even where it matches nothing yet), then as expanded, for the folders matched.
        patterns = data_file_patterns(args.data_files)
        _check_output_outside_source(args, patterns)
        try:
            args.data_files = expand_data_files(patterns)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"--data-files: {error}") from error
        _check_output_outside_source(args, args.data_files)
    if args.dataset_config_name is not None and args.dataset_name is None:  # the data files' builder takes none
        raise ValueError("--dataset-config-name picks a configuration of --dataset-name, not of --data-files: leave "
                         "it out.")
    if args.dataset_format is not None and args.data_files is None:
        raise ValueError("--dataset-format reads --data-files (the annotation file or folder): give it.")
    if args.embeddings is not None and args.rerank_model is not None:
        raise ValueError("--rerank-model scores the images with CLIP, but an embeddings folder has no images: "
                         "caption the dataset itself (--dataset-name or --data-files).")
    if args.shard_size is not None and args.streaming:
        raise ValueError("--shard-size splits a dataset read whole; with --streaming each data file is a shard.")
    return True


def _check_output_outside_source(args: argparse.Namespace, data_files: Sequence[str] = ()) -> None:
    """Refuse an --output that is, or lies inside, a folder the source reads (a folder of `data_files`, the
    --data-files paths, or one that a glob pattern among them searches; a local --dataset-name or --embeddings
    folder): a resume would read the caption shards written there as source data."""
    folders = [("--data-files", path) for path in data_files]
    folders += [("--dataset-name", args.dataset_name), ("--embeddings", args.embeddings)]
    check_output_outside_inputs(
        args.output,
        "--output",
        folders,
        "a rerun would read the caption shards written there as source data",
        written=(shard_file_name(0, 1), RUN_FILE),
    )


def _refuse_dataset_options(args: argparse.Namespace) -> None:
    """Refuse the dataset source's options given with image files or --embeddings, which would ignore them."""
    given = ["--" + name.replace("_", "-") for name in DATASET_OPTIONS if getattr(args, name) is not None]
    if not given:
        return
    source, why = (
        ("image files", "they are captioned as given") if args.images
        else ("--embeddings", "an embeddings folder is read whole, as `clipcap embed` wrote it")
    )
    options, verb, them = (given[0], "applies", "it") if len(given) == 1 else (
        ", ".join(given[:-1]) + " and " + given[-1], "apply", "them")
    raise ValueError(f"{options} {verb} to a dataset (--dataset-name or --data-files), not to {source}: {why}. "
                     f"Leave {them} out.")


# The captioner arguments that this command's options name otherwise; the others are their names with dashes.
_OPTIONS = {"reranker": "--rerank-model"}


def _option_spelling(name: str, value=None) -> str:
    """How `check_decoding_options`' messages name a captioner argument here: `--num-beams 3`, `--do-sample`."""
    option = _OPTIONS.get(name, "--" + name.replace("_", "-"))
    return option if value is None or value is True else f"{option} {value}"


def _decoding_kwargs(args: argparse.Namespace) -> dict:
    """
    The `ClipCapCaptioner` arguments of the decoding options, refused here, before any work, when they do not go
    together (by the captioner's own rules, naming the options).
    """
    kwargs = decoding_kwargs(args)
    # Only those given: the settings a run with --output records stay those of earlier runs, which it resumes.
    if args.num_candidates > 1:
        kwargs["num_candidates"] = args.num_candidates
    if args.rerank_model is not None:
        kwargs["reranker"] = args.rerank_model
    if args.num_return_sequences > 1:
        kwargs["num_return_sequences"] = args.num_return_sequences
    check_decoding_options(**kwargs, spelling=_option_spelling)
    # Greedy and beam search draw no random numbers (nor does the reranker): a seed changes nothing. Warned, not
    # refused: an --output run that earlier versions recorded with it resumes with the same options.
    if args.seed is not None and not args.do_sample:
        warnings.warn("--seed has no effect without --do-sample: greedy and beam search draw no random numbers.",
                      stacklevel=2)
    return kwargs


def _captioner_kwargs(decoding: dict) -> dict:
    """
    `decoding` with the captions per image also when 1 (not recorded, as above): `--num-return-sequences` defaults to
    1 whatever the model's generation config says.
    """
    return {**decoding, "num_return_sequences": decoding.get("num_return_sequences", 1)}


def run(args: argparse.Namespace) -> int:
    decoding = _decoding_kwargs(args)
    dataset = _dataset_source(args)
    if args.rerank_model is not None:  # before the source and the ClipCap model are loaded
        check_clip_model(args.rerank_model, "--rerank-model")
    if dataset:
        # Before the source is read, which hashes every image: a bad --device or --model is named at once. The model
        # loads after the source, as `_caption_files` loads it after finding the images.
        resolve_device(args.device)
        check_clipcap_model(args.model, "--model")
    if args.max_new_tokens is not None:  # likewise, rather than at the first batch
        check_caption_fits_positions(args.model, args.max_new_tokens, "--max-new-tokens")
    return _caption_dataset(args, decoding) if dataset else _caption_files(args, decoding)


def _caption_dataset(args: argparse.Namespace, decoding: dict) -> int:
    from ..inference import ClipCapCaptioner, caption_dataset_to_parquet
    from ..inference.sharded import (
        DEFAULT_SHARD_SIZE,
        SHOWN_ONLY,
        distributed_rank,
        finished_caption_run,
        resolve_local_paths,
    )
    from ..utils.loading import model_identity

    # The options not given: their defaults, recorded in caption_run.json as before they defaulted to None.
    args.split = DEFAULT_SPLIT if args.split is None else args.split
    args.streaming = bool(args.streaming)
    if args.embeddings is not None:
        from ..data.embeddings import load_embeddings

        dataset = load_embeddings(args.embeddings)
    else:
        from ..data.sources import load_image_source

        dataset = load_image_source(
            dataset_name=args.dataset_name,
            dataset_config_name=args.dataset_config_name,
            data_files=args.data_files,
            split=args.split,
            image_column=args.image_column,
            streaming=args.streaming,
            dataset_format=args.dataset_format,
            image_root=args.image_root,
            on_bad_image=args.on_bad_image,
        )
    # Each model by its identity, so that a resume names it by any path but cannot swap in other weights; the paths
    # as given are recorded for people to read (SHOWN_ONLY). The source's paths are resolved, for a resume that
    # names them otherwise.
    source = {name: getattr(args, name) for name in _SOURCE_SETTINGS}
    settings = {
        "model": model_identity(args.model),
        "source": {**source, **{name: resolve_local_paths(source[name]) for name in _SOURCE_PATHS}},
        "shard_size": args.shard_size or DEFAULT_SHARD_SIZE,
        # The precision the model runs in: without --dtype, the one it loads in, known once it is loaded.
        "dtype": None if args.dtype is None else _dtype_name(args.dtype),
        "decoding": {name: value for name, value in decoding.items() if name != "reranker"},
        "rerank_model": None if args.rerank_model is None else model_identity(args.rerank_model),
        "seed": args.seed,
        SHOWN_ONLY: {"model": args.model, "rerank_model": args.rerank_model},
    }
    run_options = {"batch_size": args.batch_size, "shard_size": settings["shard_size"], "seed": args.seed}
    summary = finished_caption_run(
        dataset,
        args.output,
        settings=settings,
        loaded_settings=("dtype",) if args.dtype is None else (),
        do_sample=decoding["do_sample"],
        device_type=resolve_device(args.device).type,
        **run_options,
    )
    if summary is None:  # shards left to caption: only now are the models loaded
        model, processor = load_model_and_processor(args.model, args.device)
        if args.embeddings is not None:
            from ..data.embeddings import check_embeddings

            # This model's vision tower's, and whole: a folder still growing would move rows between input shards.
            check_embeddings(args.embeddings, model, processor.image_processor, finished=True)
        captioner = ClipCapCaptioner(model, processor, dtype=args.dtype, **_captioner_kwargs(decoding))
        settings["dtype"] = _dtype_name(model.dtype)
        summary = caption_dataset_to_parquet(
            captioner, dataset, args.output, on_bad_image=args.on_bad_image, settings=settings, **run_options
        )
    rank, world_size = distributed_rank()
    who = f"Rank {rank} of {world_size}" if world_size > 1 else "Done"
    skipped = f", {summary.num_bad_rows} unreadable image(s) skipped" if summary.num_bad_rows else ""
    print(f"{who}: wrote {len(summary.written)} shard(s) of {summary.num_shards} ({summary.num_captions} captions"
          f"{skipped}); {len(summary.skipped)} already finished. Captions: {args.output}", file=sys.stderr)
    return 0


def _dtype_name(dtype: torch.dtype) -> str:
    """A dtype as caption_run.json records it: "float32"."""
    return str(dtype).removeprefix("torch.")


def _caption_files(args: argparse.Namespace, decoding: dict) -> int:
    paths = expand_image_paths(args.images)
    if args.gallery:
        check_gallery_path(args.gallery, taken=paths)
    model, processor = load_model_and_processor(args.model, args.device)
    if args.seed is not None:
        torch.manual_seed(args.seed)

    results = []
    captioner_kwargs = _captioner_kwargs(decoding)
    stopped = False
    try:
        for batch in iter_captions(model, processor, paths, args.batch_size, dtype=args.dtype, **captioner_kwargs):
            if not args.json:  # print as we go, so that a failure later on loses none of the captions before it
                for result in batch:
                    if result.error is None:
                        # One line per caption: a newline or tab in a caption or file name would break the
                        # PATH<TAB>CAPTION lines; the caption's whitespace is collapsed, and other control
                        # characters (a model's terminal escape sequences) escaped, as the name's are.
                        returned = result.candidates if args.num_return_sequences > 1 else [result.caption]
                        for caption in returned:
                            caption = escape_controls(" ".join(caption.split()))
                            print(f"{escape_controls(str(result.path))}\t{caption}", flush=True)
            results.extend(batch)
    except (KeyboardInterrupt, SystemExit):
        stopped = True
        raise
    finally:
        # With --on-bad-image skip, an unreadable image is left out of the JSON and the gallery too.
        shown = [result for result in results if result.error is None or args.on_bad_image == "error"]
        if args.json:  # also when the run fails: the captions made before are kept, as valid JSON
            json.dump([_json_entry(result) for result in shown], sys.stdout, indent=2,
                      ensure_ascii=not stdout_is_utf8())
            sys.stdout.write("\n")
        # Likewise the gallery, but not when the user stopped the run (Ctrl-C): an earlier, complete gallery is kept
        # rather than replaced by part of one. An unreadable image shows its name and the error.
        if args.gallery and shown and not stopped:
            records = [
                GalleryRecord(result.path, result.caption or "",
                              scores=None if result.clip_score is None else {"CLIPScore": result.clip_score})
                for result in shown
            ]
            gallery = write_gallery(records, args.gallery, title=f"Captions by {args.model}")
            print(f"Gallery: {gallery}", file=sys.stderr)
    errors = [result.error for result in results if result.error is not None]
    if errors and args.on_bad_image == "skip" and len(errors) == len(results):
        # Every image left out: a run without a single caption must not pass for one that captioned.
        raise UnreadableImagesError(
            errors,
            len(results),
            "None could be captioned: --on-bad-image skip leaves out images that cannot be read, and here every one "
            "was. Check that the files are images Pillow reads, and rerun.",
        )
    if errors and args.on_bad_image == "skip":
        skipped = UnreadableImagesError(errors, len(results), "Left out of the captions (--on-bad-image skip).")
        print(f"Warning: {skipped}", file=sys.stderr)
    elif errors:  # after the other images' captions, JSON and gallery
        raise UnreadableImagesError(errors, len(results))
    return 0


def _json_entry(result) -> dict:
    if result.error is not None:
        return {"image": str(result.path), "caption": None, "error": result.error}
    entry = {"image": str(result.path), "caption": result.caption}
    if result.candidates is not None:
        entry["candidates"] = result.candidates
    if result.clip_score is not None:
        entry["clip_score"] = result.clip_score
    return entry
