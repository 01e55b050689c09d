"""Training ClipCap with the Hugging Face `Trainer`: recipes, argument dataclasses, caption evaluation and LoRA.

Three recipes (see [`RECIPES`]) set the defaults of a run; any argument given explicitly overrides them:

- `mlp_finetune`: the paper's MLP mapper (prefix 10) with GPT-2 fine-tuned: lr 2e-5, 5000 warmup steps, batch 40,
  10 epochs;
- `transformer_frozen`: the paper's transformer mapper (prefix 40, clip length 40, 8 layers) with a frozen GPT-2,
  which stays in eval mode (no dropout) and gets no gradients;
- `lora`: the MLP mapper, fully trained, with LoRA adapters (peft) on the language model's linear layers.

Run it with `clipcap train ...` or `python examples/run_clipcap.py ...` (the same arguments), e.g.

```bash
clipcap train --recipe transformer_frozen --dataset_format coco-karpathy --train_file dataset_coco.json \\
    --image_root coco/ --output_dir clipcap-coco --do_train --do_eval --eval_strategy epoch
```
"""

from .arguments import RECIPES, DataArguments, EmbedArguments, ModelArguments, SourceArguments
from .lora import add_lora, load_lora_model, lora_target_modules, merge_lora
from .run import build_model, main, parse_args, train
from .trainer import ClipCapTrainer, caption_dataset

__all__ = [
    "RECIPES",
    "ClipCapTrainer",
    "DataArguments",
    "EmbedArguments",
    "ModelArguments",
    "SourceArguments",
    "add_lora",
    "build_model",
    "caption_dataset",
    "load_lora_model",
    "lora_target_modules",
    "main",
    "merge_lora",
    "parse_args",
    "train",
]
