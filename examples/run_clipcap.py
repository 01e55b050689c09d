#!/usr/bin/env python
"""
Train or evaluate a ClipCap image captioner with the Hugging Face `Trainer`, in the style of transformers'
`examples/pytorch/*/run_*.py`: three argument dataclasses (`ModelArguments`, `DataArguments` and
`TrainingArguments`, parsed by `HfArgumentParser`), then build the model, get the data ready in one call (the
source read through `datasets`, each image's CLIP embedding computed once across all processes, one row per caption),
train, evaluate by captioning, save. `clipcap train` runs the same code with the same arguments.

The dataclasses and the steps live in `clipcap_hf.training` so that the `clipcap` command and this script cannot
drift apart; read `clipcap_hf/training/run.py` (the `train` function) for the flow.

Examples:

```bash
# (a) the paper's MLP mapper with GPT-2 fine-tuned, on the Karpathy split of COCO
python examples/run_clipcap.py --recipe mlp_finetune --dataset_format coco-karpathy \\
    --train_file dataset_coco.json --image_root coco/ --output_dir clipcap-mlp \\
    --do_train --do_eval --eval_strategy epoch --save_strategy epoch

# (b) the transformer mapper with a frozen GPT-2, bf16 on a GPU, beam search for the evaluation captions
python examples/run_clipcap.py --recipe transformer_frozen --dataset_format coco-karpathy \\
    --train_file dataset_coco.json --image_root coco/ --output_dir clipcap-transformer --bf16 \\
    --do_train --do_eval --eval_strategy epoch --generation_num_beams 5

# (c) LoRA on GPT-2, mapper trained; also writes the merged plain checkpoint to clipcap-lora/merged
python examples/run_clipcap.py --recipe lora --dataset_format conceptual-captions \\
    --train_file train.tsv --validation_file val.tsv --image_root cc_images/ --output_dir clipcap-lora \\
    --do_train --do_eval

# (d) any source datasets reads: webdataset shards (img2dataset), parquet, a Hub dataset, or embeddings computed
# beforehand with `clipcap embed` (see docs/data.md)
python examples/run_clipcap.py --recipe mlp_finetune --train_file "cc3m/*.tar" --output_dir clipcap-cc3m --do_train
python examples/run_clipcap.py --recipe mlp_finetune --embeddings cc3m-embeddings --output_dir clipcap-cc3m --do_train

# Several GPUs or machines: launch the same command with torchrun or accelerate (see docs/training.md, "Several GPUs
# and machines")
torchrun --nproc_per_node 8 examples/run_clipcap.py --recipe mlp_finetune ...
```

All arguments can also come from one JSON file: `python examples/run_clipcap.py args.json`.
"""

from clipcap_hf.training import main

if __name__ == "__main__":
    main()
