"""Training throughput at GPT-2-small size: our Trainer recipes against a loop doing what the paper's code does.

For each recipe, (a) MLP mapper + fine-tuned GPT-2 (prefix 10, 512-d CLIP embedding) and (b) transformer mapper +
frozen GPT-2 (prefix 40, clip length 40, 8 layers, 640-d), two runs from cached CLIP embeddings, batch 40, caption
lengths drawn from N(11.5, 2.5) tokens:

- reference: the paper's `train()`: every batch padded to the dataset's longest caption, GPT-2's full forward (LM-head
  logits and a 50,257-way softmax on every position, prefix and padding included, `ignore_index=0`), in (b) the
  frozen GPT-2's weights still require gradients (only the mapper is in the optimizer), as in `ClipCaptionPrefix`,
  and AdamW updating one parameter at a time (`transformers.AdamW`; here `torch.optim.AdamW(foreach=False)`);
- ours: `ClipCapTrainer` as the recipes configure it: `ClipCapDataCollator` (per-batch padding, EOS appended), the
  model's training loss (LM head applied at caption positions only; a frozen LM gets no weight gradients), the
  Trainer's default optimizer (fused AdamW) and, as in the paper, no gradient clipping.

Both use the same model classes and attention kernel (the reference with transformers' seven-operation `gelu_new`, ours
with the fused tanh-GELU that ClipCap models compute it with), and the same caption token counts. Each run is a
subprocess that loads the same modules, so `peak_rss_gb` (the process's peak resident memory) is its own.
`padded_caption_tokens` is a batch's caption positions, padding and the EOS included, the image prefix not: the
dataset's longest caption for the reference, the mean of each batch's longest for ours. `matmul_fraction` is the run's
counted FLOPs per second (torch's FlopCounterMode over forward and backward; the optimizer is not counted) divided
by the machine's fp32 matmul rate (a 2048x2048 `torch.mm`) measured in the same process (`matmul_gflops`). Steps are
timed after `--warmup-steps` untimed ones (the first steps of a run grow the heap that later steps reuse: see
`clipcap_hf/utils/memory.py`). `--profile` adds, for our runs, where one step's time goes by torch.profiler
(`time_shares`: matrix products, attention kernels, the optimizer step, and the rest with its largest operators).
Prints one JSON line.

    python benchmarks/bench_train.py [--steps 3] [--warmup-steps 3] [--threads N] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from _common import call_seconds, cpu_name, matmul_rate, use_seven_operation_gelu_new

BATCH_SIZE = 40
CAPTION_MEAN, CAPTION_SD = 11.5, 2.5
DATASET_CAPTIONS = 10_000  # the global padding length is the longest of these, as the paper's loader computes it
RECIPES = {
    "a": {"mapping_type": "mlp", "prefix_length": 10, "prefix_dim": 512, "freeze_language_model": False},
    "b": {
        "mapping_type": "transformer",
        "prefix_length": 40,
        "clip_length": 40,
        "mapping_num_layers": 8,
        "prefix_dim": 640,
        "freeze_language_model": True,
    },
}


def caption_lengths(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.normal(CAPTION_MEAN, CAPTION_SD, count)), 1, None).astype(int)


def build_model(recipe: dict):
    from transformers import CLIPVisionConfig, GPT2Config

    from clipcap_hf import ClipCapConfig, ClipCapForConditionalGeneration

    settings = {key: value for key, value in recipe.items() if key != "freeze_language_model"}
    # The vision tower is never run (training from cached embeddings); keep it tiny.
    vision_config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=1,
        image_size=32,
        patch_size=32,
        projection_dim=settings["prefix_dim"],
    )
    torch.manual_seed(0)
    model = ClipCapForConditionalGeneration(
        ClipCapConfig(vision_config=vision_config, text_config=GPT2Config(), **settings)
    )
    if recipe["freeze_language_model"]:
        model.freeze_language_model()
    return model


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def count_flops(model, batches) -> float:
    """Mean forward + backward FLOPs per batch (matmuls and attention), as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    total = 0
    for batch in batches:
        with FlopCounterMode(display=False) as counter:
            model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        total += counter.get_total_flops()
    return total / len(batches)


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm"}


def time_shares(profiler) -> dict:
    """
    Shares of the profiled steps' CPU time: matmuls and attention kernels (their own time), the optimizer step (all
    of it, its kernels included), the rest; and the operators taking the most time of their own outside matmuls and
    attention (optimizer kernels among them, if large).
    """
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    matmul = sum(event.self_cpu_time_total for event in events if event.key in MATMUL_OPS)
    attention = sum(event.self_cpu_time_total for event in events if "scaled_dot_product" in event.key)
    optimizer = sum(event.cpu_time_total for event in events if event.key.startswith("Optimizer.step#"))
    others = [event for event in events if event.key not in MATMUL_OPS and "scaled_dot_product" not in event.key]
    top = sorted(others, key=lambda event: -event.self_cpu_time_total)[:6]
    return {
        "matmul": round(matmul / total, 3),
        "attention": round(attention / total, 3),
        "optimizer_step": round(optimizer / total, 3),
        "other": round((total - matmul - attention - optimizer) / total, 3),
        "top_other_ops": {event.key: round(event.self_cpu_time_total / total, 3) for event in top},
    }


# ---------------------------------------------------------------- reference: the paper's training loop


def run_reference(recipe: dict, steps: int, warmup_steps: int = 1) -> dict:
    model = build_model(recipe)
    use_seven_operation_gelu_new(model.language_model)  # GPT-2 as the paper's code ran it
    if recipe["freeze_language_model"]:
        model.language_model.requires_grad_(True)  # ClipCaptionPrefix optimizes the mapper, yet GPT-2 keeps gradients
    model.train()
    language_model, prefix_length = model.language_model, recipe["prefix_length"]
    if recipe["freeze_language_model"]:
        language_model.eval()  # ClipCaptionPrefix.train() keeps GPT-2 in eval mode
    trained = model.mapping_network if recipe["freeze_language_model"] else model
    # transformers.AdamW, which the paper uses, updates one parameter at a time, as torch's foreach=False does.
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=2e-5, foreach=False)
    max_length = int(caption_lengths(DATASET_CAPTIONS).max())
    generator = torch.Generator().manual_seed(1)
    lengths = caption_lengths(BATCH_SIZE * (warmup_steps + steps), seed=2)

    def batch(index: int) -> dict:
        tokens = torch.zeros(BATCH_SIZE, max_length, dtype=torch.long)  # the paper pads with 0
        for row, length in enumerate(lengths[index * BATCH_SIZE : (index + 1) * BATCH_SIZE]):
            tokens[row, :length] = torch.randint(1, 50257, (length,), generator=generator)
        mask = torch.cat((torch.ones(BATCH_SIZE, prefix_length), (tokens > 0).float()), dim=1)
        return {
            "tokens": tokens,
            "mask": mask,
            "prefix": torch.randn(BATCH_SIZE, recipe["prefix_dim"], generator=generator),
        }

    def loss_of(data: dict) -> torch.Tensor:
        prefix = model.mapping_network(data["prefix"])
        embeds = torch.cat((prefix, language_model.transformer.wte(data["tokens"])), dim=1)
        logits = language_model(inputs_embeds=embeds, attention_mask=data["mask"]).logits
        logits = logits[:, prefix_length - 1 : -1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), data["tokens"].flatten(), ignore_index=0)

    times = []
    batches = [batch(index) for index in range(warmup_steps + steps)]
    for data in batches:
        start = time.perf_counter()
        model.zero_grad()
        loss_of(data).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)

    class Wrapped(torch.nn.Module):  # FlopCounterMode needs `model(**batch).loss`
        def forward(self, **data):
            return type("Output", (), {"loss": loss_of(data)})

    flops = count_flops(Wrapped(), batches[warmup_steps:])
    return {"step_seconds": times[warmup_steps:], "flops_per_step": flops, "padded_caption_tokens": max_length}


# ---------------------------------------------------------------- ours: Trainer + collator + the model's loss


def word_tokenizer():
    """A GPT-2-sized vocabulary of one-token words (no tokenizer files can be downloaded here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{index}": index for index in range(50257)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="w50256", unk_token="w0")


def run_ours(recipe: dict, steps: int, warmup_steps: int = 1, profile: bool = False) -> dict:
    import datasets
    from transformers import TrainerCallback, TrainingArguments

    from clipcap_hf import ClipCapImageProcessor, ClipCapProcessor
    from clipcap_hf.data import ClipCapDataCollator
    from clipcap_hf.training import ClipCapTrainer

    model = build_model(recipe)
    processor = ClipCapProcessor(
        ClipCapImageProcessor(size=32, crop_size=32), word_tokenizer(), num_image_tokens=model.config.prefix_length
    )
    generator = torch.Generator().manual_seed(1)
    # Lengths count the EOS the collator appends, so captions have the same token counts as the reference's.
    lengths = caption_lengths(BATCH_SIZE * (warmup_steps + steps), seed=2) - 1
    captions = [
        " ".join(f"w{i}" for i in torch.randint(1, 50256, (max(n, 1),), generator=generator).tolist()) for n in lengths
    ]
    dataset = datasets.Dataset.from_dict({"caption": captions, "image_index": list(range(len(captions)))})
    table = torch.randn(len(captions), recipe["prefix_dim"], generator=generator)
    batches = []

    class Recording(ClipCapDataCollator):
        def __call__(self, features):
            batch = super().__call__(features)
            batches.append(batch)
            return batch

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    args = TrainingArguments(
        output_dir="/tmp/bench_train",
        per_device_train_batch_size=BATCH_SIZE,
        max_steps=warmup_steps + steps,
        learning_rate=2e-5,
        max_grad_norm=0.0,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
    )
    trainer = ClipCapTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        callbacks=[timer],
        data_collator=Recording(processor, image_embeds=table),
    )
    trainer.train()
    # The collator runs before on_step_begin, so step times leave it out: add it back from a separate timing.
    collate_seconds = min(
        call_seconds(lambda: trainer.data_collator([dataset[i] for i in range(BATCH_SIZE)])) for _ in range(3)
    )
    model.train()
    timed = batches[warmup_steps : warmup_steps + steps]
    flops = count_flops(model, timed)
    result = {
        "step_seconds": [t + collate_seconds for t in timer.times[warmup_steps:]],
        "flops_per_step": flops,
        # input_ids hold the prefix's image tokens, then the caption: count the caption, as the reference does.
        "padded_caption_tokens": float(
            np.mean([b["input_ids"].shape[1] - model.config.prefix_length for b in timed])
        ),
    }
    result["peak_rss_gb"] = peak_rss_gb()
    if profile:  # the Trainer's own step again, on the same batches, after the timed run
        from torch.profiler import profile as torch_profile

        from clipcap_hf.utils.memory import reuse_freed_memory

        def step(batch):
            trainer.training_step(model, batch)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad()

        # As the Trainer's timed steps ran: in the block, after warm-up steps that grow the heap again (train() handed
        # it back when it returned).
        with reuse_freed_memory():
            for batch in batches[:warmup_steps]:
                step(batch)
            with torch_profile() as profiler:
                for batch in timed:
                    step(batch)
        result["time_shares"] = time_shares(profiler)
    return result


def child(variant: str, implementation: str, steps: int, warmup_steps: int, profile: bool) -> None:
    import clipcap_hf.training  # noqa: F401  (both runs load the same modules, so their memory baselines match)

    recipe = RECIPES[variant]
    if implementation == "ours":
        result = run_ours(recipe, steps, warmup_steps, profile)
    else:
        result = run_reference(recipe, steps, warmup_steps)
    result.setdefault("peak_rss_gb", peak_rss_gb())  # ours measures it before its profiled steps
    result["matmul_flops_per_second"] = matmul_rate()
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per run, after the warm-up steps.")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=3,
        help="Untimed steps first: the first few steps of a run grow the heap that later steps reuse.",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--profile", action="store_true", help="Add where our steps' time goes (torch.profiler).")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "IMPLEMENTATION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(*args.child, args.steps, args.warmup_steps, args.profile)
        return

    report = {
        "batch_size": BATCH_SIZE,
        "caption_tokens": f"N({CAPTION_MEAN}, {CAPTION_SD})",
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "threads": args.threads or torch.get_num_threads(),
        "cpu": cpu_name(),
        "torch": torch.__version__,
    }
    targets = {"a": 1.4, "b": 1.5}
    for variant in RECIPES:
        runs = {}
        for implementation in ("reference", "ours"):
            command = [sys.executable, __file__, "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps)]
            command += ["--child", variant, implementation]
            if args.threads:
                command += ["--threads", str(args.threads)]
            if args.profile:
                command += ["--profile"]
            output = subprocess.run(
                command, check=False, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
            )
            lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
            if not lines:
                raise RuntimeError(f"{variant}/{implementation} failed:\n{output.stderr[-3000:]}")
            runs[implementation] = json.loads(lines[-1][len("RESULT ") :])
        for implementation, run in runs.items():
            seconds = float(np.mean(run["step_seconds"]))
            report[f"{variant}_{implementation}"] = {
                "samples_per_second": round(BATCH_SIZE / seconds, 2),
                "peak_rss_gb": round(run["peak_rss_gb"], 2),
                "padded_caption_tokens": round(run["padded_caption_tokens"], 1),
                "gflops_per_step": round(run["flops_per_step"] / 1e9, 1),
                "matmul_fraction": round(run["flops_per_step"] / seconds / run["matmul_flops_per_second"], 3),
                # The rate `matmul_fraction` divides by, measured in the run's own process, and each step's seconds:
                # a busy spell shows as a spread.
                "matmul_gflops": round(run["matmul_flops_per_second"] / 1e9, 1),
                "step_seconds": [round(step, 2) for step in run["step_seconds"]],
            }
            if "time_shares" in run:
                report[f"{variant}_{implementation}"]["time_shares"] = run["time_shares"]
        ours, reference = report[f"{variant}_ours"], report[f"{variant}_reference"]
        report[f"{variant}_speedup"] = round(ours["samples_per_second"] / reference["samples_per_second"], 2)
        report[f"{variant}_flop_ratio"] = round(reference["gflops_per_step"] / ours["gflops_per_step"], 2)
        report[f"{variant}_target"] = targets[variant]
        report[f"{variant}_memory_ratio"] = round(ours["peak_rss_gb"] / reference["peak_rss_gb"], 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
