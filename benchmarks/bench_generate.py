"""Batched, cached `generate()` against the paper's decoding loop.

The reference does what the original code does: one image at a time, and at every step the whole sequence (prefix
and tokens so far) goes through GPT-2 again, with no key/value cache. Its greedy step is the original `generate2`'s:
the top-p (0.8) filter over the sorted vocabulary, then argmax (the filter never removes the argmax, so it is
greedy). Beam search keeps 5 sequences per image and ranks them by summed log-probability divided by length.
Both sides use the same model (GPT-2 small sized, random weights, no EOS so every caption runs the full length; the
reference with transformers' seven-operation `gelu_new`, ours with the fused tanh-GELU that ClipCap models compute it
with) and the same 512-d image embeddings.

Each side runs as it ships: on the CPU our `generate()` computes linear layers with oneDNN where it measures faster
(`clipcap_hf.onednn`), the reference with PyTorch's default kernels (MKL), as the paper's code does. The
`*_without_onednn` figures time our `generate()` with `torch.backends.mkldnn.enabled = False`, on the reference's matrix
kernels.

`greedy_bound_s` is the physical floor for our greedy run on this machine: each decoding step after the first takes
at least the longer of reading all of the language model's weights once (tied embeddings counted once) at the
machine's measured memory bandwidth (the sum of a 512 MB tensor) and doing its counted FLOPs at the machine's fp32
matmul rate; the first step (prefill, mapper included) does its counted FLOPs at that rate. The matmul rate is the
faster of a 2048x2048 product through `torch.mm` (MKL) and through oneDNN: on AMD processors MKL reaches about half
of oneDNN's. `*_bound_multiple` is a time over that floor. The `*_static_compiled_*` figures time
`generate(cache_implementation="static", compile_config=CompileConfig(...))` with transformers' switch that compiles
on the CPU too (it compiles on accelerators only), after a warm-up call that compiles; `--skip-paper` leaves out the
paper's loop (about 90 s) for quick runs. The `*_prepacked_*` figures time `generate()` inside one
`clipcap_hf.inference.captioning_run(model)` block, as a captioning run over many batches holds it (`clipcap
caption`, evaluation): each weight that oneDNN computes is packed once, on its first use, and the memory one call
frees serves the next (`clipcap_hf.utils.memory`). Our runs count the fewest
seconds of `--repeats` timed calls (3), the paper's loop one call. Each kind of linear call settles on MKL after
one timed call of each kernel where oneDNN is no faster, and otherwise after four calls of each (`clipcap_hf.onednn`):
the decoder's kinds within the warm-up call, the prefill's and the mapper's (one call per `generate()` and batch
shape) after four to ten calls: the single calls may still measure them while timed, and the prepacked runs warm up
until every kind has settled, as over a long run;
`cpu_linear_choices` lists every kind of the model with its kernel ("measuring" until settled) and both kernels'
fewest milliseconds ("-" before a timed call).

Where a prepacked greedy step goes (`step_breakdown_s`, its parts timed in interleaved rounds): `greedy_step_ms` is
a decoding step after the first (all tokens' time less one token's, per step); `greedy_step_linear_layers_ms` the
language model's linear layers alone on one step's rows, back to back (the work the floor bounds, at the kernels' real
speed); `greedy_step_fixed_costs_ms` a step of the same model at width 64 with a 1,000-token vocabulary (same depth,
operators and Python on tiny tensors) less that model's own linear layers: what a step costs outside its linear layers
apart from arithmetic and memory traffic. The remainder is attention, the key/value cache, elementwise work and the
logits at full size.

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from _common import cpu_name, matmul_rate, memory_bandwidth, onednn_matmul_rate, use_seven_operation_gelu_new
from torch import nn
from transformers import CompileConfig, GPT2Config
from transformers.pytorch_utils import Conv1D

from clipcap_hf import ClipCapConfig, ClipCapForConditionalGeneration
from clipcap_hf.inference import captioning_run
from clipcap_hf.onednn import cpu_linear_choices, cpu_linear_mode, onednn_linear_available


@torch.no_grad()
def paper_greedy(model, image_embeds: torch.Tensor, steps: int, top_p: float = 0.8) -> list[list[int]]:
    wte = model.get_input_embeddings()
    captions = []
    for embedding in image_embeds:
        sequence = model.get_prefix_embeds(image_embeds=embedding[None])
        tokens = []
        for _ in range(steps):
            logits = model.language_model(inputs_embeds=sequence, use_cache=False).logits[:, -1]
            sorted_logits, sorted_indices = logits.sort(descending=True)
            remove = sorted_logits.softmax(-1).cumsum(-1) > top_p
            remove[..., 1:] = remove[..., :-1].clone()
            remove[..., 0] = False
            logits[:, sorted_indices[remove]] = -float("inf")
            token = int(logits.argmax(-1))
            tokens.append(token)
            sequence = torch.cat((sequence, wte(torch.tensor([[token]]))), dim=1)
        captions.append(tokens)
    return captions


@torch.no_grad()
def paper_beam_search(model, image_embeds: torch.Tensor, steps: int, beams: int = 5) -> list[list[int]]:
    wte = model.get_input_embeddings()
    captions = []
    for embedding in image_embeds:
        sequence = model.get_prefix_embeds(image_embeds=embedding[None])
        log_probs = model.language_model(inputs_embeds=sequence, use_cache=False).logits[0, -1].log_softmax(-1)
        scores, tokens = log_probs.topk(beams)
        tokens = tokens[:, None]
        sequence = torch.cat((sequence.expand(beams, -1, -1), wte(tokens)), dim=1)
        for length in range(2, steps + 1):
            log_probs = model.language_model(inputs_embeds=sequence, use_cache=False).logits[:, -1].log_softmax(-1)
            candidate = (scores[:, None] + log_probs) / length  # summed log-probability over length
            best, flat = candidate.view(-1).topk(beams)
            source, token = flat // log_probs.shape[1], flat % log_probs.shape[1]
            scores = best * length
            tokens = torch.cat((tokens[source], token[:, None]), dim=1)
            sequence = torch.cat((sequence[source], wte(token[:, None])), dim=1)
        captions.append(tokens[0].tolist())
    return captions


def weight_bytes_per_step(model) -> int:
    """Bytes of the language model's weights, each tensor once (GPT-2's LM head is its input embedding)."""
    unique = {parameter.data_ptr(): parameter for parameter in model.language_model.parameters()}
    return sum(parameter.numel() * parameter.element_size() for parameter in unique.values())


@torch.no_grad()
def prefill_flops(model, image_embeds: torch.Tensor) -> int:
    """FLOPs of generation's first step: the mapper and the language model over the image tokens, one logit row."""
    from torch.utils.flop_counter import FlopCounterMode

    input_ids = torch.full((image_embeds.shape[0], model.config.prefix_length), model.config.image_token_id)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids, image_embeds=image_embeds, logits_to_keep=1)
    return counter.get_total_flops()


@torch.no_grad()
def decoding_step_flops(model, batch: int) -> int:
    """
    FLOPs of one decoding step: one new token per sequence through the language model (its attention over the
    cache, under a thousandth of the step at these sizes, left out).
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model.language_model(input_ids=torch.zeros(batch, 1, dtype=torch.long))
    return counter.get_total_flops()


def narrow_model(model):
    """
    `model` with the same depth and prefix at width 64 (4 heads) and a 1,000-token vocabulary: its decoding steps run
    the same operators and Python on tiny tensors, so they time what a step costs apart from its arithmetic.
    """
    text_config = GPT2Config(
        n_embd=64, n_layer=model.config.text_config.n_layer, n_head=4, vocab_size=1000, bos_token_id=None,
        eos_token_id=None,
    )
    return ClipCapForConditionalGeneration(ClipCapConfig(text_config=text_config)).eval()


def linear_shapes(model) -> set[tuple[int, int]]:
    """`(in_features, out_features)` of each linear layer of `model` (GPT-2's `Conv1D` included)."""
    return {
        tuple(module.weight.shape) if isinstance(module, Conv1D) else (module.in_features, module.out_features)
        for module in model.modules() if type(module) in (nn.Linear, Conv1D)
    }


def linear_layers_run(model, rows: int):
    """A call of the language model's linear layers (LM head included), back to back, on one decoding step's rows."""
    layers = [module for module in model.language_model.modules() if type(module) in (nn.Linear, Conv1D)]

    def width(layer):  # Conv1D stores its weight as (in, out)
        return layer.weight.shape[0] if isinstance(layer, Conv1D) else layer.in_features

    inputs = {width(layer): torch.randn(rows, 1, width(layer)) for layer in layers}

    def run():
        for layer in layers:
            layer(inputs[width(layer)])

    return run


@torch.no_grad()
def step_breakdown_s(model, image_embeds: torch.Tensor, new_tokens: int, repeats: int) -> dict[str, float]:
    """
    Where a greedy decoding step after the first goes, in seconds, with the weights packed as over a captioning run:
    `step` (`new_tokens` tokens' time less one token's, per step); `linear_layers`, the language model's linear layers
    alone on one step's rows; `fixed_costs`, a step of `narrow_model(model)` less its own linear layers (Python,
    dispatch and threads outside them). Each model's calls run on the kernels measured faster for them. Timed in rounds,
    one call of each per round, so that the parts are measured close in time (this shared machine's speed drifts by
    30% within minutes); the fewest seconds of each count.
    """
    narrow = narrow_model(model)
    rows = image_embeds.shape[0]

    def tokens(generator, count):
        return lambda: generator.generate(image_embeds=image_embeds, max_new_tokens=count, do_sample=False)

    runs = {
        "all": tokens(model, new_tokens), "first": tokens(model, 1), "linear_layers": linear_layers_run(model, rows),
        "narrow_all": tokens(narrow, new_tokens), "narrow_first": tokens(narrow, 1),
        "narrow_linear_layers": linear_layers_run(narrow, rows),
    }
    with captioning_run(model), captioning_run(narrow):
        fewest = {name: timed(run, warm_up=run)[0] for name, run in runs.items()}
        for _ in range(repeats - 1):
            fewest = {name: min(fewest[name], timed(run, warm_up=lambda: None)[0]) for name, run in runs.items()}
    narrow_step_s = (fewest["narrow_all"] - fewest["narrow_first"]) / (new_tokens - 1)
    return {
        "step": (fewest["all"] - fewest["first"]) / (new_tokens - 1),
        "linear_layers": fewest["linear_layers"],
        "fixed_costs": narrow_step_s - fewest["narrow_linear_layers"],
    }


def until_settled(run, model, most_calls: int = 16) -> None:
    """
    Call `run()`, within a `captioning_run` block, until every packed kind of linear call of `model` has settled on a
    kernel (at most `most_calls` times): a captioning run over many batches spends only its first few measuring, and
    the prefill's and the mapper's kinds, one call per `generate()`, take four to ten calls to settle.
    """
    shapes = linear_shapes(model)
    for _ in range(most_calls):
        run()
        if all(
            choice["kernel"] is not None for choice in cpu_linear_choices()
            if choice["packed"] and (choice["in_features"], choice["out_features"]) in shapes
        ):
            return


def timed(function, warm_up, repeats: int = 1):
    """
    The fewest seconds `function()` takes in `repeats` calls, and its result, after an untimed `warm_up()` with the
    same shapes: a first call also pays for memory the allocator has not mapped yet (about 0.4 s of a 1.3 s greedy
    run here), and the first `generate()` packs the weights for oneDNN. On a shared machine a busy spell only ever
    adds time, so the fewest is the closest to the machine's own speed.
    """
    warm_up()
    best_s = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best_s = min(best_s, time.perf_counter() - start)
    return best_s, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--skip-paper", action="store_true", help="Leave out the paper's loop (quick runs).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed calls of our generate() (the fewest counts); "
                        "the paper's loop, about 90 s, runs once.")
    args = parser.parse_args()

    torch.manual_seed(0)
    text_config = GPT2Config(bos_token_id=None, eos_token_id=None)  # GPT-2 small: 124M parameters
    model = ClipCapForConditionalGeneration(ClipCapConfig(text_config=text_config)).eval()
    image_embeds = torch.randn(args.images, 512)
    common = {"max_new_tokens": args.new_tokens, "do_sample": False}

    prefix_length = model.config.prefix_length

    def ours_greedy_run():  # the captions, after the image tokens the sequences start with
        return model.generate(image_embeds=image_embeds, **common)[:, prefix_length:]

    def ours_beam_run():
        return model.generate(image_embeds=image_embeds, num_beams=args.beams, **common)[:, prefix_length:]

    def static_compiled_greedy_run():
        compile_config = CompileConfig(fullgraph=True, mode=None)
        compile_config._compile_all_devices = True  # transformers' own switch: compile on the CPU too
        return model.generate(
            image_embeds=image_embeds, cache_implementation="static", compile_config=compile_config, **common
        )[:, prefix_length:]

    bandwidth, mkl_matmul, onednn_matmul = memory_bandwidth(), matmul_rate(), onednn_matmul_rate()
    matmul = max(mkl_matmul, onednn_matmul)
    step_flops = decoding_step_flops(model, args.images)
    step_bound_s = max(weight_bytes_per_step(model) / bandwidth, step_flops / matmul)
    bound_s = (args.new_tokens - 1) * step_bound_s + prefill_flops(model, image_embeds) / matmul

    # Ours warms up on the same batch; the reference, whose images all have the same shapes, on its first image.
    ours_greedy_s, ours_greedy = timed(ours_greedy_run, warm_up=ours_greedy_run, repeats=args.repeats)
    ours_beam_s, ours_beam = timed(ours_beam_run, warm_up=ours_beam_run, repeats=args.repeats)
    # Weights packed once for oneDNN and kept across calls, as a captioning run over many batches can hold them.
    with captioning_run(model):
        prepacked_greedy_s, prepacked_greedy = timed(
            ours_greedy_run, warm_up=lambda: until_settled(ours_greedy_run, model), repeats=args.repeats
        )
        prepacked_beam_s, prepacked_beam = timed(
            ours_beam_run, warm_up=lambda: until_settled(ours_beam_run, model), repeats=args.repeats
        )
    breakdown = step_breakdown_s(model, image_embeds, args.new_tokens, args.repeats)
    compiled_greedy_s, compiled_greedy = timed(
        static_compiled_greedy_run, warm_up=static_compiled_greedy_run, repeats=args.repeats
    )
    torch.backends.mkldnn.enabled = False  # the reference's kernels
    try:
        no_onednn_greedy_s, no_onednn_greedy = timed(ours_greedy_run, warm_up=ours_greedy_run, repeats=args.repeats)
        no_onednn_beam_s, no_onednn_beam = timed(ours_beam_run, warm_up=ours_beam_run, repeats=args.repeats)
    finally:
        torch.backends.mkldnn.enabled = True
    report = {
        "benchmark": "generate",
        "images": args.images,
        "new_tokens": args.new_tokens,
        "beams": args.beams,
        "ours_greedy_s": round(ours_greedy_s, 3),
        "ours_beam_s": round(ours_beam_s, 3),
        "ours_greedy_without_onednn_s": round(no_onednn_greedy_s, 3),
        "ours_beam_without_onednn_s": round(no_onednn_beam_s, 3),
        "ours_greedy_static_compiled_s": round(compiled_greedy_s, 3),
        "ours_greedy_prepacked_s": round(prepacked_greedy_s, 3),
        "ours_beam_prepacked_s": round(prepacked_beam_s, 3),
        "greedy_prepacked_bound_multiple": round(prepacked_greedy_s / bound_s, 2),
        "greedy_bound_s": round(bound_s, 3),
        "greedy_bound_multiple": round(ours_greedy_s / bound_s, 2),
        "greedy_without_onednn_bound_multiple": round(no_onednn_greedy_s / bound_s, 2),
        "greedy_static_compiled_bound_multiple": round(compiled_greedy_s / bound_s, 2),
        "greedy_tokens_identical": ours_greedy.tolist() == no_onednn_greedy.tolist(),
        "static_compiled_tokens_identical": compiled_greedy.tolist() == ours_greedy.tolist(),
        "prepacked_tokens_identical": prepacked_greedy.tolist() == ours_greedy.tolist()
        and prepacked_beam.tolist() == ours_beam.tolist(),
        "beam_best_identical": ours_beam.tolist() == no_onednn_beam.tolist(),
        "greedy_step_bound_ms": round(step_bound_s * 1e3, 2),
        "greedy_step_ms": round(breakdown["step"] * 1e3, 2),
        "greedy_step_linear_layers_ms": round(breakdown["linear_layers"] * 1e3, 2),
        "greedy_step_fixed_costs_ms": round(breakdown["fixed_costs"] * 1e3, 2),
        "greedy_step_memory_bound": weight_bytes_per_step(model) / bandwidth >= step_flops / matmul,
        "machine_bandwidth_gbps": round(bandwidth / 1e9, 1),
        "machine_matmul_gflops": round(matmul / 1e9, 1),
        "machine_matmul_gflops_torch_mm": round(mkl_matmul / 1e9, 1),
        "machine_matmul_gflops_onednn": round(onednn_matmul / 1e9, 1),
    }
    if not args.skip_paper:
        use_seven_operation_gelu_new(model.language_model)  # GPT-2 as the paper's code ran it; ours are timed
        paper_greedy_s, reference_greedy = timed(
            lambda: paper_greedy(model, image_embeds, args.new_tokens),
            warm_up=lambda: paper_greedy(model, image_embeds[:1], args.new_tokens),
        )
        paper_beam_s, reference_beam = timed(
            lambda: paper_beam_search(model, image_embeds, args.new_tokens, args.beams),
            warm_up=lambda: paper_beam_search(model, image_embeds[:1], args.new_tokens, args.beams),
        )
        report.update(
            paper_greedy_s=round(paper_greedy_s, 3),
            paper_beam_s=round(paper_beam_s, 3),
            greedy_speedup=round(paper_greedy_s / ours_greedy_s, 2),
            beam_speedup=round(paper_beam_s / ours_beam_s, 2),
            greedy_speedup_without_onednn=round(paper_greedy_s / no_onednn_greedy_s, 2),
            beam_speedup_without_onednn=round(paper_beam_s / no_onednn_beam_s, 2),
        )
        report["greedy_tokens_identical"] &= ours_greedy.tolist() == reference_greedy
        report["beam_best_identical"] &= ours_beam.tolist() == reference_beam
    shapes = linear_shapes(model)
    report.update(
        onednn=onednn_linear_available(),
        cpu_linear_mode=cpu_linear_mode(model),
        # The kernel each kind of the model's linear calls ran on here (`auto`), the step breakdown's narrow model's
        # kinds left out.
        cpu_linear_choices=sorted(
            f"{choice['in_features']}->{choice['out_features']} {choice['weight']}, {choice['rows_up_to']} rows"
            f"{', packed' if choice['packed'] else ''}: {choice['kernel'] or 'measuring'} "
            f"({choice['mkl_ms'] or '-'} ms MKL, {choice['onednn_ms'] or '-'} ms oneDNN)"
            for choice in cpu_linear_choices()
            if (choice["in_features"], choice["out_features"]) in shapes
        ),
        torch_threads=torch.get_num_threads(),
        machine=platform.machine(),
        cpu=cpu_name(),
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
