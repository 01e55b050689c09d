"""`clipcap convert-original CHECKPOINT --output DIR`: a checkpoint released with the paper into a ClipCap folder."""

from __future__ import annotations

import argparse

from ..configuration_clipcap import VISION_BACKENDS
from ..conversion.convert_original import PRESETS, convert_original_checkpoint
from ._utils import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="The released .pt file, e.g. coco_weights.pt.")
    parser.add_argument("--output", required=True, help="Folder to create.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="Which release (default: coco-mlp or coco-transformer, after the checkpoint's mapper).")
    parser.add_argument("--vision-backend", choices=VISION_BACKENDS, default=None,
                        help="Default: open_clip if --open-clip-pretrained or a local-dir:/hf-hub: --vision-model is "
                             "given, else the preset's (clip for the MLP releases, open_clip for the transformer one).")
    parser.add_argument("--vision-model", default=None,
                        help="CLIP checkpoint name or folder; or open_clip model name (with --open-clip-pretrained), "
                             "local-dir:PATH or hf-hub:REPO (default: the preset's).")
    parser.add_argument("--open-clip-pretrained", default=None,
                        help="open_clip pretrained tag, e.g. openai; selects the open_clip backend. Default: the "
                             "preset's, when --vision-model is not given or names the preset's open_clip model (e.g. "
                             "ViT-B-32 for the MLP releases); another open_clip model name needs it.")
    parser.add_argument("--tokenizer", default="gpt2", help="Tokenizer name or folder (default: gpt2).")
    parser.add_argument("--normalize-prefix", action=argparse.BooleanOptionalAction, default=None,
                        help="Override the preset's CLIP embedding normalisation.")
    parser.add_argument("--mapping-num-heads", type=positive_int, default=None,
                        help="Transformer mapper heads (default 8).")
    parser.add_argument("--lm-num-heads", type=positive_int, default=None, help="GPT-2 heads (default: width / 64).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace an output folder that an earlier conversion wrote, if it holds nothing else and "
                             "none of its files was changed since (an empty folder is written without it).")


def run(args: argparse.Namespace) -> int:
    # `clipcap`'s main() prints a ValueError or OSError (e.g. a part that cannot be downloaded) as a message.
    report = convert_original_checkpoint(
        args.checkpoint,
        args.output,
        preset=args.preset,
        vision_backend=args.vision_backend,
        vision_model=args.vision_model,
        open_clip_pretrained=args.open_clip_pretrained,
        tokenizer=args.tokenizer,
        normalize_prefix=args.normalize_prefix,
        mapping_num_heads=args.mapping_num_heads,
        lm_num_heads=args.lm_num_heads,
        overwrite=args.overwrite,
    )
    config = report.config
    print(
        f"Wrote {report.output_dir} ({report.preset}: {config.mapping_type} mapper, prefix length "
        f"{config.prefix_length}, {config.vision_backend} vision tower); max |logit delta| against the original "
        f"computation {report.max_logits_delta:.2g}; dropped {len(report.dropped_keys)} obsolete GPT-2 buffers."
    )
    return 0
