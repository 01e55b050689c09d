"""End-to-end captioning speed: ClipCap against the captioners users would pick instead.

Each model is built from its config at the published size with random weights (nothing is downloaded) and captions
the same number of images from pixels (`pixel_values` at the model's own resolution) to exactly `--new-tokens` tokens
(`min_new_tokens` holds EOS back), greedy and with `--beams` beams. Each timing is one run after an untimed warm-up
call with the same shapes.

- ClipCap MLP: CLIP ViT-B/32 + MLP mapper (prefix 10) + GPT-2 small, as the paper's COCO model;
- ClipCap transformer: the same tower and language model, transformer mapper (prefix 40, clip length 40, 8 layers);
- VisionEncoderDecoder ViT-B/16 + GPT-2 small with cross-attention (the common "vit-gpt2" captioner);
- BLIP-base (`BlipForConditionalGeneration`, ViT-B/16 at 384 px, BERT-base decoder);
- GIT-base (`GitForCausalLM`, ViT-B/16 at 224 px, 6-layer BERT-sized decoder).

`clipcap_mlp_speedup_*` is the fastest peer's time (ClipCap's own two excluded) over ClipCap MLP's. Every model is
timed through a single `generate()` call; `clipcap_mlp_run_*_s` time ClipCap MLP again as a captioning run over many
batches holds it (`clipcap caption`, evaluation: one `clipcap_hf.inference.captioning_run` block, entered before the
warm-up call, in which each oneDNN weight is packed once and the memory one batch frees serves the next), with
`clipcap_mlp_run_speedup_*` against the same peers. `--small` builds tiny configs of the same architectures, for a
smoke test in seconds. Prints one JSON line.

    python benchmarks/bench_peers.py [--images 16] [--new-tokens 20] [--beams 5] [--small]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from _common import cpu_name, synchronize
from torch import nn
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    CLIPVisionConfig,
    GitConfig,
    GitForCausalLM,
    GPT2Config,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
)

from clipcap_hf import ClipCapConfig, ClipCapForConditionalGeneration
from clipcap_hf.inference import captioning_run

CLIPCAP_NAMES = ("clipcap_mlp", "clipcap_transformer")


@dataclass
class Captioner:
    """A model and how it captions: `generate(pixel_values=..., **generate_kwargs)` on images of `image_size`."""

    model: nn.Module
    image_size: int
    generate_kwargs: dict = field(default_factory=dict)

    def pixels(self, images: int, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        pixel_values = torch.randn(images, 3, self.image_size, self.image_size, generator=generator)
        return pixel_values.to(self.model.device, self.model.dtype)

    @torch.no_grad()
    def caption(self, pixel_values: torch.Tensor, new_tokens: int, beams: int = 1, **kwargs) -> torch.Tensor:
        return self.model.generate(
            pixel_values=pixel_values,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            num_beams=beams,
            do_sample=False,
            **self.generate_kwargs,
            **kwargs,
        )


def _sizes(small: bool) -> dict:
    """Widths of the towers and decoders: published (ViT-B, GPT-2 small, BERT-base) or tiny for `--small`."""
    if small:
        return {
            "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
            "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 1000, "n_positions": 128,
                     "bos_token_id": 999, "eos_token_id": 999},
            "bert": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "vocab_size": 1000, "max_position_embeddings": 128},
            "patch": {32: 16, 16: 8},  # patch size for a published patch size, so the patch grids stay small
            "image": {224: 32, 384: 48},
            "projection_dim": 24,
        }
    return {
        "vision": {},  # each config's defaults are ViT-B
        "gpt2": {},  # GPT-2 small
        "bert": {},  # BERT-base (GIT-base: 6 layers, its own default)
        "patch": {32: 32, 16: 16},
        "image": {224: 224, 384: 384},
        "projection_dim": 512,
    }


def clipcap_config(mapping_type: str, small: bool = False, **overrides) -> ClipCapConfig:
    """A ClipCap config at the published sizes (tiny for `small`); `overrides` replace mapper fields."""
    sizes = _sizes(small)
    mapper = {"prefix_length": 10}
    if mapping_type == "transformer":
        mapper = {"prefix_length": 40, "clip_length": 40, "mapping_num_layers": 8}
        if small:
            mapper = {"prefix_length": 4, "clip_length": 4, "mapping_num_layers": 2, "mapping_num_heads": 4}
    mapper.update(overrides)
    vision_config = CLIPVisionConfig(
        **sizes["vision"],
        image_size=sizes["image"][224],
        patch_size=sizes["patch"][32],
        projection_dim=mapper.get("prefix_dim", sizes["projection_dim"]),
    )
    return ClipCapConfig(
        vision_config=vision_config, text_config=GPT2Config(**sizes["gpt2"]), mapping_type=mapping_type, **mapper
    )


def build_clipcap(mapping_type: str, small: bool = False, seed: int = 0) -> Captioner:
    config = clipcap_config(mapping_type, small)
    torch.manual_seed(seed)
    return Captioner(ClipCapForConditionalGeneration(config).eval(), config.vision_config.image_size)


def build_vit_gpt2(small: bool = False, seed: int = 0) -> Captioner:
    sizes = _sizes(small)
    encoder = ViTConfig(**sizes["vision"], image_size=sizes["image"][224], patch_size=sizes["patch"][16])
    decoder = GPT2Config(**sizes["gpt2"], is_decoder=True, add_cross_attention=True)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    end_of_text = decoder.vocab_size - 1  # GPT-2's <|endoftext|> starts, ends and pads captions
    config.decoder_start_token_id = config.pad_token_id = config.eos_token_id = end_of_text
    torch.manual_seed(seed)
    model = VisionEncoderDecoderModel(config=config).eval()
    model.generation_config.update(
        decoder_start_token_id=end_of_text, pad_token_id=end_of_text, eos_token_id=end_of_text
    )
    return Captioner(model, sizes["image"][224])


def build_blip(small: bool = False, seed: int = 0) -> Captioner:
    sizes = _sizes(small)
    vision = {**sizes["vision"], "image_size": sizes["image"][384], "patch_size": sizes["patch"][16]}
    text = {key: value for key, value in sizes["bert"].items()}
    if small:
        text.update(encoder_hidden_size=vision["hidden_size"], bos_token_id=3, sep_token_id=4, pad_token_id=0)
    config = BlipConfig(vision_config=vision, text_config=text)
    torch.manual_seed(seed)
    return Captioner(BlipForConditionalGeneration(config).eval(), vision["image_size"])


def build_git(small: bool = False, seed: int = 0) -> Captioner:
    sizes = _sizes(small)
    vision = {**sizes["vision"], "image_size": sizes["image"][224], "patch_size": sizes["patch"][16]}
    text = {key: value for key, value in sizes["bert"].items()}
    if not small:
        text = {}  # GitConfig's defaults are GIT-base's (6 layers)
    else:
        text.update(bos_token_id=3, eos_token_id=4, pad_token_id=0)
    config = GitConfig(vision_config=vision, **text)
    torch.manual_seed(seed)
    model = GitForCausalLM(config).eval()
    model.generation_config.update(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    return Captioner(model, vision["image_size"])


BUILDERS: dict[str, Callable[..., Captioner]] = {
    "clipcap_mlp": lambda small: build_clipcap("mlp", small),
    "clipcap_transformer": lambda small: build_clipcap("transformer", small),
    "vit_gpt2": build_vit_gpt2,
    "blip_base": build_blip,
    "git_base": build_git,
}


def time_captioning(
    captioner: Captioner, pixel_values, new_tokens: int, beams: int, **kwargs
) -> tuple[float, torch.Tensor]:
    """Seconds of one run after an untimed warm-up with the same shapes, and its tokens."""
    captioner.caption(pixel_values, new_tokens, beams, **kwargs)
    synchronize(pixel_values.device)
    start = time.perf_counter()
    tokens = captioner.caption(pixel_values, new_tokens, beams, **kwargs)
    synchronize(pixel_values.device)
    return time.perf_counter() - start, tokens


def speedups(times: dict[str, float]) -> dict:
    """ClipCap MLP's speedup over the fastest peer (ClipCap's own models excluded), and which peer that is."""
    peers = {name: seconds for name, seconds in times.items() if name not in CLIPCAP_NAMES}
    fastest = min(peers, key=peers.get)
    return {"fastest_peer": fastest, "clipcap_mlp_speedup": round(peers[fastest] / times["clipcap_mlp"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="Tiny configs of the same architectures (smoke test).")
    args = parser.parse_args()

    report = {"benchmark": "peers", "images": args.images, "new_tokens": args.new_tokens, "beams": args.beams,
              "small": args.small}
    times = {"greedy": {}, "beam": {}}
    modes = (("greedy", 1), ("beam", args.beams))
    for name, build in BUILDERS.items():
        captioner = build(small=args.small)
        pixel_values = captioner.pixels(args.images)
        for mode, beams in modes:
            seconds, _ = time_captioning(captioner, pixel_values, args.new_tokens, beams)
            times[mode][name] = report[f"{name}_{mode}_s"] = round(seconds, 4)
        if name == "clipcap_mlp":
            with captioning_run(captioner.model):
                for mode, beams in modes:
                    seconds, _ = time_captioning(captioner, pixel_values, args.new_tokens, beams)
                    report[f"clipcap_mlp_run_{mode}_s"] = round(seconds, 4)
        del captioner
    for mode, mode_times in times.items():
        fastest = speedups(mode_times)
        report[f"fastest_peer_{mode}"] = fastest["fastest_peer"]
        report[f"clipcap_mlp_speedup_{mode}"] = fastest["clipcap_mlp_speedup"]
        run_s = report[f"clipcap_mlp_run_{mode}_s"]
        report[f"clipcap_mlp_run_speedup_{mode}"] = round(mode_times[fastest["fastest_peer"]] / run_s, 2)
    report.update(
        torch=torch.__version__, torch_threads=torch.get_num_threads(), machine=platform.machine(),
        cpu=cpu_name(),
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
