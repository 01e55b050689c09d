"""Training: the caption-only loss, Trainer recipes, LoRA, evaluation by captioning, resume and torchrun."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import datasets
import pytest
import torch
from conftest import (
    CAPTIONED_IMAGES,
    distinct_captioning_model,
    mkldnn_disabled,
    packs_run,
    random_images,
    reuse_seen_by_generate,
    tiny_model,
    tiny_processor,
)
from test_folder_locks import HOLD_LOCK
from transformers import AutoConfig, AutoProcessor, LlamaConfig, TrainerCallback, TrainingArguments

from clipcap_hf import ClipCapForConditionalGeneration, ClipCapProcessor
from clipcap_hf.commands import main as cli_main
from clipcap_hf.data import ClipCapDataCollator, embed_images, group_by_image, load_image_folder
from clipcap_hf.modeling_clipcap import CACHE_NAME, PLAIN_LM_HEAD_MODEL_TYPES
from clipcap_hf.training import (
    ClipCapTrainer,
    DataArguments,
    ModelArguments,
    add_lora,
    build_model,
    load_lora_model,
    main,
    merge_lora,
    parse_args,
)
from clipcap_hf.training.run import RUN_LOCK_NAME, _check_dataset_name_is_read
from clipcap_hf.utils.memory import on_glibc, reuses_freed_memory

REPO = Path(__file__).resolve().parents[1]


def quiet_model(tokenizer, mapping_type="mlp", language="gpt2", seed=0, dropout=0.0):
    """A tiny model with the given dropout in its language model (0: train and eval mode compute the same thing)."""
    if language == "llama":  # Llama has no dropout here
        text_config = LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return tiny_model(tokenizer, mapping_type, seed=seed, text_config=text_config)
    return tiny_model(tokenizer, mapping_type, seed=seed, text_dropout=dropout)


def training_args(output_dir, **kwargs):
    defaults = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=2,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
    )
    defaults.update(kwargs)
    return TrainingArguments(**defaults)


@pytest.fixture
def embedded(tmp_path, caption_folder, tokenizer, processor):
    """The caption folder with cached embeddings from one tiny model's vision tower (shared by the tiny models)."""
    model = tiny_model(tokenizer)
    return embed_images(load_image_folder(caption_folder), model, processor.image_processor, tmp_path / "cache")


def batch_for(processor, captions, dim=24, seed=0):
    batch = processor(captions=captions)
    batch["image_embeds"] = torch.randn(len(captions), dim, generator=torch.Generator().manual_seed(seed))
    return batch


# ---------------------------------------------------------------- the caption-only loss


@pytest.mark.parametrize("mapping_type, language", [("mlp", "gpt2"), ("transformer", "gpt2"), ("mlp", "llama")])
def test_training_loss_computes_lm_head_scores_only_where_a_caption_token_is_predicted(
    tokenizer, processor, mapping_type, language
):
    model = quiet_model(tokenizer, mapping_type, language)
    batch = batch_for(processor, ["A dog runs on the beach.", "Two cats sleep!", "A dog."])
    num_caption_tokens = int((batch["labels"] != -100).sum())  # EOS included

    model.eval()
    full = model(**batch)
    full.loss.backward()
    full_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    model.train()
    rows_scored = []
    head = model.get_output_embeddings()
    with mock.patch.object(head, "forward", lambda x, f=head.forward: rows_scored.append(x.shape) or f(x)):
        fast = model(**batch)
    assert fast.logits is None
    assert rows_scored == [torch.Size([num_caption_tokens, 32])]  # no prefix, no padding position
    torch.testing.assert_close(fast.loss, full.loss)
    fast.loss.backward()
    assert set(full_grads) == {name for name, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, full_grads[name], atol=1e-6, rtol=1e-4, msg=name)

    # With Trainer's token count the loss is the sum over tokens divided by that count.
    summed = model(**batch, num_items_in_batch=torch.tensor(7))
    torch.testing.assert_close(summed.loss, full.loss * num_caption_tokens / 7)


def tiny_language_model_config(model_type, vocab_size):
    """A two-layer, 32-wide, dropout-free config of any causal LM family (each takes the size fields it knows)."""
    sizes = dict(
        hidden_size=32, num_hidden_layers=2, num_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, ffn_dim=64, word_embed_proj_dim=32, rotary_dim=4, max_position_embeddings=64,
        vocab_size=vocab_size,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, attention_types=[[["global", "local"], 1]],
        dropout=0.0, attention_dropout=0.0, hidden_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    defaults = AutoConfig.for_model(model_type)
    known = set(defaults.to_dict()) | set(defaults.attribute_map)
    return AutoConfig.for_model(model_type, **{name: value for name, value in sizes.items() if name in known})


@pytest.mark.parametrize("model_type", sorted(PLAIN_LM_HEAD_MODEL_TYPES) + ["cohere", "granite"])
def test_training_fast_path_only_for_families_whose_logits_are_the_lm_head_output(tokenizer, processor, model_type):
    text_config = tiny_language_model_config(model_type, len(tokenizer))
    # Cohere and Granite scale their logits after the LM head: they must keep their own forward.
    text_config.logit_scale = text_config.logits_scaling = 4.0
    model = tiny_model(tokenizer, text_config=text_config)
    batch = batch_for(processor, ["A dog runs on the beach.", "Two cats sleep!"])
    full = model.eval()(**batch)
    trained = model.train()(**batch)
    assert (trained.logits is None) == (model_type in PLAIN_LM_HEAD_MODEL_TYPES)
    torch.testing.assert_close(trained.loss, full.loss)


def test_gradient_checkpointing_on_a_frozen_language_model_warns_that_it_does_not_apply(tokenizer, caplog):
    logging.Logger.warning_once.cache_clear()  # transformers' once-only warnings: an earlier test may have warned
    model = quiet_model(tokenizer, "transformer")
    model.gradient_checkpointing_enable()
    with caplog.at_level("WARNING"):
        model.train()
    assert "Gradient checkpointing" not in caplog.text  # a trained language model is checkpointed
    model.freeze_language_model()
    with caplog.at_level("WARNING"):
        model.train()
    assert "Gradient checkpointing does not apply to the frozen language model" in caplog.text


def test_trainer_counts_every_caption_token_as_an_item(tmp_path, tokenizer, processor, embedded):
    """The first caption token is predicted (by the prefix), so it counts in `num_items_in_batch` too."""
    dataset, table = embedded
    model = quiet_model(tokenizer)
    seen = []
    original_forward = model.forward

    def recording_forward(**kwargs):
        seen.append(int(kwargs["num_items_in_batch"]))
        return original_forward(**kwargs)

    model.forward = recording_forward
    trainer = ClipCapTrainer(
        model=model,
        args=training_args(tmp_path / "out", per_device_train_batch_size=7, max_steps=1),
        train_dataset=dataset,
        data_collator=ClipCapDataCollator(processor, image_embeds=table),
    )
    trainer.train()
    captions = [c for texts in CAPTIONED_IMAGES.values() for c in ([texts] if isinstance(texts, str) else texts)]
    expected = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in captions)
    assert seen == [expected]


def test_scratch_training_arguments_save_nothing_report_nowhere_and_train_on_the_cpu_without_a_gpu(
    tmp_path, monkeypatch
):
    """What the quickstart and each ablation run train with."""
    from clipcap_hf.training.trainer import scratch_training_arguments

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = scratch_training_arguments(
        tmp_path, max_steps=95, batch_size=3, learning_rate=1e-3, logging_steps=9, seed=5, verbose=False,
        weight_decay=0.25,
    )
    assert (args.output_dir, args.save_strategy, args.report_to, args.remove_unused_columns) == (
        str(tmp_path), "no", [], False
    )
    assert (args.max_steps, args.per_device_train_batch_size, args.learning_rate, args.warmup_steps) == (95, 3, 1e-3, 3)
    assert (args.logging_steps, args.seed, args.weight_decay, args.disable_tqdm) == (9, 5, 0.25, True)
    assert args.use_cpu is True


# ---------------------------------------------------------------- recipes


def test_recipes_set_the_paper_defaults_and_explicit_arguments_win(tmp_path):
    model_args, data_args, args = parse_args(["--recipe", "mlp_finetune", "--output_dir", str(tmp_path)])
    assert (args.learning_rate, args.warmup_steps, args.per_device_train_batch_size, args.num_train_epochs) == (
        2e-5,
        5000,
        40,
        10,
    )
    assert (model_args.mapping_type, model_args.prefix_length, model_args.freeze_language_model) == ("mlp", 10, False)
    assert args.remove_unused_columns is False

    model_args, _, args = parse_args(["--recipe", "transformer_frozen", "--output_dir", str(tmp_path)])
    assert (model_args.mapping_type, model_args.prefix_length, model_args.clip_length) == ("transformer", 40, 40)
    assert (model_args.mapping_num_layers, model_args.normalize_prefix, model_args.freeze_language_model) == (
        8,
        True,
        True,
    )
    assert (args.learning_rate, args.warmup_steps) == (2e-5, 5000)

    model_args, _, args = parse_args(
        ["--recipe", "lora", "--output_dir", str(tmp_path), "--learning_rate", "1e-3", "--lora_r", "4"]
    )
    assert model_args.use_lora and model_args.save_merged_model and model_args.lora_r == 4
    assert args.learning_rate == 1e-3

    with pytest.raises(SystemExit):
        parse_args(["--recipe", "nonsense", "--output_dir", str(tmp_path)])


def test_lora_options_without_use_lora_are_refused_and_with_it_get_their_defaults(tmp_path):
    # They were ignored: the run fine-tuned the whole language model and wrote no adapters.
    for given in (["--lora_r", "4"], ["--lora_dropout", "0.1", "--lora_target_modules", "c_attn"],
                  ["--save_merged_model"], ["--lora_alpha", "8"]):
        names = ", ".join(option for option in given if option.startswith("--"))
        with pytest.raises(ValueError, match=f"^{names} set up LoRA adapters: add --use_lora, or leave them out"):
            parse_args([*given, "--output_dir", str(tmp_path)])
    model_args = parse_args(["--use_lora", "--lora_alpha", "4", "--output_dir", str(tmp_path)])[0]
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (8, 4, 0.05)
    assert model_args.save_merged_model is False
    model_args = parse_args(["--recipe", "lora", "--output_dir", str(tmp_path)])[0]
    assert (model_args.lora_r, model_args.lora_alpha, model_args.save_merged_model) == (8, 16, True)
    # The recipe, not the user, gave --save_merged_model: the error says so, and how to leave it out.
    message = (r"^--save_merged_model set up LoRA adapters: add --use_lora, or leave them out \(--recipe lora sets "
               r"--save_merged_model: add --save_merged_model false\)\.$")
    with pytest.raises(ValueError, match=message):
        parse_args(["--recipe", "lora", "--use_lora", "false", "--output_dir", str(tmp_path)])
    model_args = parse_args(["--recipe", "lora", "--use_lora", "false", "--save_merged_model", "false",
                             "--output_dir", str(tmp_path)])[0]  # fmt: skip
    assert not model_args.use_lora and not model_args.save_merged_model


@pytest.mark.parametrize(
    "given, message",
    [
        (["--lora_r", "0"], "--lora_r must be at least 1 (the adapters' rank), got 0."),
        (["--lora_dropout", "1"], "--lora_dropout must be from 0 up to (not including) 1, got 1.0."),
        (["--lora_dropout", "-0.1"], "--lora_dropout must be from 0 up to (not including) 1, got -0.1."),
        # A scale of 0 gives the adapters no gradient: the run trained nothing, with status 0.
        (["--lora_alpha", "0"], "--lora_alpha must be above 0 (the adapters' scale is lora_alpha / lora_r), got 0."),
    ],
)
def test_lora_rank_alpha_and_dropout_out_of_range_are_refused_as_the_arguments_are_read(tmp_path, given, message):
    # peft refused them only once the images were embedded, in its own words.
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_args(["--use_lora", *given, "--output_dir", str(tmp_path)])


def test_lora_target_modules_the_language_model_lacks_are_refused_before_data_and_leave_no_output_dir(
    tmp_path, tokenizer, caption_folder
):
    parts = quiet_model(tokenizer)
    parts.vision_model.save_pretrained(tmp_path / "clip")
    parts.language_model.save_pretrained(tmp_path / "gpt")
    tokenizer.save_pretrained(tmp_path / "gpt")
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = run_arguments("unused", caption_folder, out, cache, "--use_lora", "--lora_target_modules", "c_attn,qkv")
    # peft adapted c_attn without a word about qkv (and, given qkv alone, refused in its own words after the data).
    message = (
        "--lora_target_modules c_attn,qkv: the language model has no module called qkv. Give names of its linear "
        "layers (adapted by default, but the output layer: c_attn,c_fc,c_proj), as a last part or a dotted path "
        "ending (attn.c_proj), or leave the option out."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        main(["--vision_model_name_or_path", str(tmp_path / "clip"), "--text_model_name_or_path",
              str(tmp_path / "gpt"), "--prefix_length", "4", *args[2:]])  # fmt: skip
    assert not out.exists() and not cache.exists()  # no base_model folder, no embeddings


def test_lora_target_modules_are_matched_as_peft_matches_them_and_must_be_adaptable(tokenizer):
    from clipcap_hf.training.lora import add_lora, check_lora_target_modules

    model = quiet_model(tokenizer)

    def lora_args(names):
        return parse_args(["--use_lora", "--lora_target_modules", names, "--output_dir", "unused"])[0]

    # A dotted path ending was refused; peft adapts the modules whose path ends with it.
    adapted = add_lora(quiet_model(tokenizer), lora_args("attn.c_proj"))
    lora_layers = {name.rsplit(".lora_A", 1)[0] for name, _ in adapted.named_modules() if name.endswith("lora_A")}
    assert lora_layers and all(name.endswith(".attn.c_proj") for name in lora_layers)
    # A layer norm (or a whole block) passed the check, and peft refused it once the images were embedded.
    for names, refused in (("ln_1", "ln_1 (LayerNorm)"), ("c_attn,attn", "attn (GPT2Attention)")):
        message = f"--lora_target_modules {names}: LoRA cannot adapt {refused}. Give names"
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            check_lora_target_modules(model, lora_args(names))
    with pytest.raises(ValueError, match=re.escape("no module called h.c_proj. Give")):
        check_lora_target_modules(model, lora_args("h.c_proj"))  # a path ending must end at a dot


def test_transformer_mapper_options_given_for_a_new_mlp_model_are_refused(tmp_path):
    # A new MLP model dropped them without a word.
    message = (
        "--clip_length 7, --mapping_num_layers 3 shape a transformer mapper, but this new model has a mlp mapper, "
        "which has neither. Add --mapping_type transformer, or leave them out."
    )
    for given in (["--mapping_type", "mlp"], [], ["--recipe", "lora"]):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            parse_args([*given, "--clip_length", "7", "--mapping_num_layers", "3", "--output_dir", str(tmp_path)])
    model_args = parse_args(["--mapping_type", "transformer", "--clip_length", "7", "--output_dir", str(tmp_path)])[0]
    assert (model_args.clip_length, model_args.mapping_num_layers) == (7, 8)
    # Those a recipe fills in apply to its own mapper only.
    model_args = parse_args(["--recipe", "transformer_frozen", "--mapping_type", "mlp", "--output_dir", str(tmp_path)])
    assert model_args[0].mapping_type == "mlp"


@pytest.mark.parametrize(
    "given", [["--mapping_num_layers", "2"], ["--mapping_num_layers", "3"], ["--clip_length", "4"]]
)
def test_transformer_mapper_options_given_for_an_mlp_checkpoint_are_refused_as_for_a_new_mlp_model(
    tmp_path, saved_model_dir, given
):
    # An MLP checkpoint took the value its config holds unused (mapping_num_layers 2), and refused another as if it
    # could be matched: "the checkpoint's: 2".
    model_args = parse_args(["--model_name_or_path", str(saved_model_dir), *given, "--output_dir", str(tmp_path)])[0]
    message = (
        f"{' '.join(given)} shape a transformer mapper, but the checkpoint --model_name_or_path {saved_model_dir} has "
        "a mlp mapper, which has neither. Leave them out."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_model(model_args)


def test_model_folders_named_with_a_tilde_load(tmp_path, tokenizer, processor, monkeypatch):
    # transformers takes `~/...` for a Hub name: a plain checkpoint, a LoRA run and the parts of a new model failed.
    monkeypatch.setenv("HOME", str(tmp_path))
    model = quiet_model(tokenizer)
    model.save_pretrained(tmp_path / "clipcap")
    processor.save_pretrained(tmp_path / "clipcap")
    model.vision_model.save_pretrained(tmp_path / "clip")
    model.language_model.save_pretrained(tmp_path / "gpt")
    tokenizer.save_pretrained(tmp_path / "gpt")
    base = ClipCapForConditionalGeneration.from_pretrained(tmp_path / "clipcap")
    add_lora(base, ModelArguments(use_lora=True)).save_pretrained(tmp_path / "lora")
    processor.save_pretrained(tmp_path / "lora")

    loaded, _ = build_model(ModelArguments(model_name_or_path="~/clipcap"))
    assert torch.equal(loaded.mapping_network.model[0].weight, model.mapping_network.model[0].weight)
    loaded, _ = build_model(ModelArguments(model_name_or_path="~/lora", use_lora=True))
    assert loaded.peft_config["default"].r == 8
    loaded, _ = build_model(
        ModelArguments(vision_model_name_or_path="~/clip", text_model_name_or_path="~/gpt", prefix_length=4)
    )
    assert torch.equal(loaded.language_model.lm_head.weight, model.language_model.lm_head.weight)


@pytest.mark.parametrize(
    "given, recipe_note",
    [
        (["--use_lora", "--freeze_language_model"], ""),
        (["--recipe", "lora", "--freeze_language_model"], ""),
        (["--recipe", "transformer_frozen", "--use_lora"], " (--recipe transformer_frozen sets"),
        (["--model_name_or_path", "a-lora-run", "--use_lora", "--freeze_language_model"], ""),
    ],
)
def test_lora_with_a_frozen_language_model_is_refused(tmp_path, given, recipe_note):
    # A new run trained its adapters anyway; a continued LoRA run froze them and trained the mapper alone.
    message = (
        "^--use_lora with --freeze_language_model: LoRA already keeps the language model's own weights frozen and "
        "trains adapters on it. To train the mapper only, leave out --use_lora; to train adapters, leave out "
        f"--freeze_language_model.{re.escape(recipe_note)}"
    )
    with pytest.raises(ValueError, match=message + ("" if recipe_note else "$")):
        parse_args([*given, "--output_dir", str(tmp_path)])
    assert parse_args(["--recipe", "lora", "--mapping_type", "transformer", "--output_dir", str(tmp_path)])[0].use_lora


def test_a_new_model_gets_the_default_architecture_and_a_checkpoint_keeps_its_own(tmp_path):
    model_args = parse_args(["--output_dir", str(tmp_path)])[0]
    assert (model_args.vision_model_name_or_path, model_args.text_model_name_or_path) == (
        "openai/clip-vit-base-patch32",
        "gpt2",
    )
    assert (model_args.mapping_type, model_args.prefix_length, model_args.normalize_prefix) == ("mlp", 10, False)
    # With a checkpoint, the recipe's architecture is no default: only what is given is checked against it.
    model_args = parse_args(["--recipe", "lora", "--model_name_or_path", "ckpt", "--output_dir", str(tmp_path)])[0]
    assert (model_args.mapping_type, model_args.prefix_length, model_args.use_lora) == (None, None, True)
    model_args = parse_args(["--model_name_or_path", "ckpt", "--prefix_length", "4", "--output_dir", str(tmp_path)])[0]
    assert (model_args.prefix_length, model_args.normalize_prefix) == (4, None)


def test_a_json_file_gets_the_recipe_and_common_defaults_and_its_own_values_win(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"recipe": "lora", "output_dir": str(tmp_path), "learning_rate": 1e-3, "lora_r": 4}))
    model_args, _, args = parse_args([str(path)])
    assert model_args.use_lora and model_args.save_merged_model and model_args.lora_r == 4
    assert (args.learning_rate, args.warmup_steps, args.remove_unused_columns) == (1e-3, 1000, False)

    path.write_text(json.dumps({"output_dir": str(tmp_path), "remove_unused_columns": True}))
    model_args, _, args = parse_args([str(path)])
    assert not model_args.use_lora and args.remove_unused_columns is True

    path.write_text(json.dumps({"recipe": "nonsense", "output_dir": str(tmp_path)}))
    with pytest.raises(ValueError, match=r"--recipe must be one of \['lora', 'mlp_finetune', 'transformer_frozen'\]"):
        parse_args([str(path)])


@pytest.mark.parametrize(
    "values, message",
    [
        # A string is truthy: "false" froze the language model.
        ({"freeze_language_model": "false"},
         "'freeze_language_model' must be true or false, got \"false\" (a string)."),
        # Raised a bare TypeError from a comparison in a check.
        ({"use_lora": True, "lora_r": "8"}, "'lora_r' must be an integer or null, got \"8\" (a string)."),
        ({"max_steps": 2.5}, "'max_steps' must be an integer, got 2.5 (a number)."),
        ({"learning_rate": True}, "'learning_rate' must be a number, got true (true or false)."),
        ({"report_to": ["none", 1]}, "'report_to' must be null or a string or a list, got [\"none\", 1] (a list)."),
    ],
)
def test_a_json_arguments_file_value_of_another_type_is_refused_naming_the_file_key_type_and_value(
    tmp_path, values, message
):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path), **values}))
    with pytest.raises(ValueError, match=f"^{re.escape(f'{path}: {message}')}$"):
        parse_args([str(path)])
    # Values of their own types: an integer for a float, an enum's string, a list of strings.
    path.write_text(json.dumps({"output_dir": str(tmp_path), "learning_rate": 1, "lr_scheduler_type": "constant",
                                "report_to": ["none"], "freeze_language_model": False, "lora_r": None}))
    model_args, _, args = parse_args([str(path)])
    assert (args.learning_rate, args.lr_scheduler_type, model_args.freeze_language_model) == (1, "constant", False)


@pytest.mark.parametrize("given", [["--caption_column", "caption"], ["--image_column", "jpg", "--caption_column", "c"]])
def test_image_and_caption_columns_with_a_dataset_format_are_refused_naming_both_options(tmp_path, given):
    # The format's loader reads its own fields: the columns were silently ignored.
    named = " and ".join(option for option in ("--image_column", "--caption_column") if option in given)
    message = (
        "--dataset_format imagefolder reads the images and captions from the format's own fields, not from columns "
        f"that --image_column and --caption_column name, so {named} would be ignored: leave "
        f"{'them' if ' and ' in named else 'it'} out, or leave out --dataset_format to read the columns of a data file."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        parse_args(["--dataset_format", "imagefolder", *given, "--output_dir", str(tmp_path)])
    assert parse_args([*given, "--output_dir", str(tmp_path)])[1].caption_column == given[-1]


def test_a_dot_args_file_beside_the_script_is_not_read_into_the_arguments_given(tmp_path, monkeypatch):
    # transformers' parser reads `<sys.argv[0] without suffix>.args` too: it added options nobody gave.
    (tmp_path / "mytrain.args").write_text("--weight_decay 0.5 --seed 1234")
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "mytrain.py")])
    training_args = parse_args(["--output_dir", str(tmp_path / "out")])[2]
    assert (training_args.weight_decay, training_args.seed) == (0.0, 42)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"output_dir": "out",}', "args.json is not valid JSON"),
        ('["--output_dir", "out"]', "args.json must hold one JSON object"),
        ('{"recipe": ["lora"], "output_dir": "out"}', r"args.json must hold .*\"recipe\", if given, a string"),
    ],
)
def test_a_malformed_json_arguments_file_is_named(tmp_path, content, message):
    path = tmp_path / "args.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        parse_args([str(path)])


@pytest.mark.parametrize(
    "option, message",
    [
        (["--label_smoothing_factor", "0.1"],
         r"--label_smoothing_factor 0.1 is not supported: ClipCap's loss covers the caption tokens only.*Leave"),
        (["--include_for_metrics", "inputs"], r"--include_for_metrics is not supported: .* --eval_caption_metrics"),
        (["--include_num_input_tokens_seen", "true"],
         r"--include_num_input_tokens_seen is not supported: Trainer would count the images' pixels"),
        (["--do_predict"], r"--do_predict is not supported; caption and score a test set with `clipcap evaluate`"),
        # Accepted and never used before: nothing is evaluated.
        (["--do_train", "--eval_caption_metrics", "bleu", "--generation_num_beams", "3"],
         r"^--eval_caption_metrics, --generation_num_beams set the evaluation data or how its images are captioned "
         r"and scored, but this run evaluates nothing: add --do_eval \(with --validation_file or --validation_split\)"),
        (["--do_train", "--generation_num_beams", "2"],
         r"^--generation_num_beams set the evaluation .* evaluates nothing"),
        (["--do_train", "--validation_file", "val.parquet", "--max_eval_samples", "5", "--generation_max_new_tokens",
          "9"], r"^--validation_file, --max_eval_samples, --generation_max_new_tokens set the evaluation data "),
        # A name no split reads: the files given train (and evaluate) instead.
        (["--do_train", "--train_file", "train.parquet", "--dataset_name", "user/captions"],
         r"^--dataset_name user/captions is read by no split of this run: .* Leave it out, or evaluate on one of its "
         r"splits: --do_eval --validation_split NAME\.$"),
        (["--do_train", "--do_eval", "--train_file", "t.parquet", "--validation_file", "v.parquet", "--dataset_name",
          "user/captions", "--validation_split", "test"], r"^--dataset_name user/captions is read by no split"),
        (["--do_train", "--train_file", "train.parquet", "--dataset_config_name", "large"],
         r"^--dataset_config_name configures a --dataset_name, and none is given: leave it out\.$"),
        # Loaded the model, then did nothing with status 0.
        ([], r"^This run would do nothing: add --do_train \(to train\), --do_eval \(to evaluate\), or both\.$"),
    ],
)
def test_trainer_options_that_do_not_fit_clipcap_are_refused_naming_the_option(tmp_path, option, message):
    with pytest.raises(ValueError, match=message):
        main(["--output_dir", str(tmp_path), *option])


def test_a_dataset_name_beside_a_train_file_is_accepted_where_the_evaluation_reads_its_split():
    data_args = DataArguments(train_file="train.parquet", dataset_name="user/captions", validation_split="test")
    _check_dataset_name_is_read(data_args, training=True, evaluating=True)  # refused below: nothing evaluated
    with pytest.raises(ValueError, match=r"^--dataset_name user/captions is read by no split of this run"):
        _check_dataset_name_is_read(data_args, training=True, evaluating=False)
    _check_dataset_name_is_read(DataArguments(dataset_name="user/captions"), training=True, evaluating=False)


def test_frozen_language_model_gets_no_gradients_stays_in_eval_mode_and_is_not_optimized(
    tmp_path, tokenizer, processor, embedded
):
    dataset, table = embedded
    model = quiet_model(tokenizer, "transformer", dropout=0.5)
    model.freeze_language_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    lm_modes = []
    model.language_model.transformer.h[0].register_forward_pre_hook(
        lambda module, args: lm_modes.append(module.training)
    )

    def vision_forward(*args, **kwargs):
        raise AssertionError("training from cached embeddings ran the vision tower")

    trainer = ClipCapTrainer(
        model=model,
        args=training_args(tmp_path / "out"),
        train_dataset=dataset,
        data_collator=ClipCapDataCollator(processor, image_embeds=table),
    )
    with mock.patch.object(model.vision_model, "forward", vision_forward):
        trainer.train()

    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.mapping_network.parameters()}
    assert lm_modes == [False, False]  # two steps, language model in eval mode (no dropout) in both
    for name, p in model.named_parameters():
        if name.startswith("mapping_network."):
            continue
        assert p.grad is None, name
        assert torch.equal(p, before[name]), name
    assert any(not torch.equal(p, before[f"mapping_network.{n}"]) for n, p in model.mapping_network.named_parameters())


def test_fine_tuned_language_model_is_optimized(tmp_path, tokenizer, processor, embedded):
    dataset, table = embedded
    model = quiet_model(tokenizer)
    trainer = ClipCapTrainer(
        model=model,
        args=training_args(tmp_path / "out", max_steps=1),
        train_dataset=dataset,
        data_collator=ClipCapDataCollator(processor, image_embeds=table),
    )
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for name, p in model.named_parameters() if not name.startswith("vision_model.")}
    assert optimized == trainable


def final_weights(tmp_path, tokenizer, processor, embedded, name, **kwargs):
    dataset, table = embedded
    model = quiet_model(tokenizer)
    trainer = ClipCapTrainer(
        model=model,
        args=training_args(tmp_path / name, **kwargs),
        train_dataset=dataset,
        data_collator=ClipCapDataCollator(processor, image_embeds=table),
    )
    result = trainer.train()
    return model, trainer, result


def test_gradient_checkpointing_and_bf16_pass_through_training_arguments(
    tmp_path, tokenizer, processor, embedded, monkeypatch
):
    # transformers 4.x records bf16 in this variable, and later Trainers of the process would inherit it.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    plain, _, _ = final_weights(tmp_path, tokenizer, processor, embedded, "plain")
    checkpointed, _, _ = final_weights(tmp_path, tokenizer, processor, embedded, "ckpt", gradient_checkpointing=True)
    assert checkpointed.language_model.transformer.gradient_checkpointing
    assert not plain.language_model.transformer.gradient_checkpointing
    for (name, a), b in zip(plain.state_dict().items(), checkpointed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)

    _, trainer, result = final_weights(tmp_path, tokenizer, processor, embedded, "bf16", bf16=True)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert torch.isfinite(torch.tensor(result.training_loss))


# ---------------------------------------------------------------- LoRA


def test_lora_trains_adapters_and_mapper_saves_reloads_and_merges(tmp_path, tokenizer, processor, embedded):
    dataset, table = embedded
    base_dir = tmp_path / "base"
    base = quiet_model(tokenizer)
    base.save_pretrained(base_dir)
    processor.save_pretrained(base_dir)
    model = ClipCapForConditionalGeneration.from_pretrained(base_dir)
    peft_model = add_lora(model, ModelArguments(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0))

    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(
        ("lora_" in name and ".language_model." in name) or ".mapping_network." in name for name in trainable
    )
    assert any(".attn.c_attn.lora_A" in name for name in trainable)
    assert any("modules_to_save" in name and "mapping_network" in name for name in trainable)
    assert not any("lm_head" in name or "vision_model" in name for name in trainable)

    out = tmp_path / "lora"
    trainer = ClipCapTrainer(
        model=peft_model,
        args=training_args(out, max_steps=3),
        train_dataset=dataset,
        data_collator=ClipCapDataCollator(processor, image_embeds=table),
    )
    trainer.train()
    trainer.save_model()
    processor.save_pretrained(out)
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()

    batch = batch_for(processor, ["A dog runs on the beach.", "Two cats sleep!"])
    peft_model.eval()
    with torch.no_grad():
        trained_logits = peft_model(**batch).logits
        base_logits = ClipCapForConditionalGeneration.from_pretrained(base_dir).eval()(**batch).logits
        reloaded_logits = load_lora_model(out).eval()(**batch).logits
    assert not torch.allclose(trained_logits, base_logits, atol=1e-3)
    torch.testing.assert_close(reloaded_logits, trained_logits)

    merged_dir = tmp_path / "merged"
    # Stopped part-way (here while writing the processor), a merge leaves no folder that a rerun would take as done.
    with mock.patch.object(ClipCapProcessor, "save_pretrained", side_effect=KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            merge_lora(out, merged_dir)
    assert sorted(path.name for path in tmp_path.iterdir() if "merged" in path.name) == []
    merge_lora(out, merged_dir)
    ClipCapProcessor.from_pretrained(merged_dir)
    # It writes the folder whole: one that is not empty (an earlier merge) is refused; the adapters' folder and the
    # folders above it, even with overwrite=True, which would have deleted the adapters with them.
    with pytest.raises(ValueError, match=r"merge_lora: output_dir .* is not empty, and the merged model is"):
        merge_lora(out, merged_dir)
    for folder in (out, out.parent):
        with pytest.raises(ValueError) as error:
            merge_lora(out, folder, overwrite=True)
        assert str(error.value) == (
            f"merge_lora: output_dir {folder} is or holds the adapters' folder ({out.resolve()}), and the merged "
            "model replaces the folder whole: give a folder of its own (e.g. output_dir/merged)."
        )
    assert (out / "adapter_config.json").exists()
    merge_lora(out, merged_dir, overwrite=True)  # an earlier merge, replaced on request
    assert (out / "adapter_config.json").exists()
    merged = ClipCapForConditionalGeneration.from_pretrained(merged_dir).eval()
    assert not any("lora" in key or "modules_to_save" in key for key in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, trained_logits, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- evaluation by captioning


def test_evaluation_captions_each_image_once_logs_distinct_captions_and_writes_predictions(
    tmp_path, tokenizer, processor, embedded
):
    dataset, table = embedded
    model = quiet_model(tokenizer)
    images = group_by_image(dataset)
    trainer = ClipCapTrainer(
        model=model,
        args=training_args(tmp_path / "out"),
        eval_dataset=dataset,
        data_collator=ClipCapDataCollator(processor, image_embeds=table),
        caption_eval_dataset=images,
        caption_eval_embeds=table,
        processing_class=processor,
        generation_kwargs={"max_new_tokens": 5, "num_beams": 2},
    )
    metrics = trainer.evaluate()

    generated = model.generate(image_embeds=table[torch.tensor(images["image_index"])], max_new_tokens=5, num_beams=2)
    expected = [caption.strip() for caption in processor.batch_decode(generated, skip_special_tokens=True)]
    assert metrics["eval_distinct_captions"] == len(set(expected))
    assert metrics["eval_distinct_caption_ratio"] == round(len(set(expected)) / 4, 4)
    assert "eval_loss" in metrics
    records = json.loads((tmp_path / "out/predictions/eval_step0.json").read_text())
    assert [r["image_id"] for r in records] == list(CAPTIONED_IMAGES)
    assert [r["caption"] for r in records] == expected
    assert records[0]["references"] == CAPTIONED_IMAGES["a.png"]


def test_caption_evaluation_needs_a_processor_and_some_images(tmp_path, tokenizer, processor, embedded):
    dataset, table = embedded
    model = quiet_model(tokenizer)
    args = training_args(tmp_path / "out")
    with pytest.raises(ValueError, match=r"needs processing_class=<the model's ClipCapProcessor> .* got NoneType"):
        ClipCapTrainer(model=model, args=args, caption_eval_dataset=group_by_image(dataset))
    with pytest.raises(ValueError, match="caption_eval_dataset has no rows; give at least one image, or None"):
        ClipCapTrainer(
            model=model, args=args, processing_class=processor, caption_eval_dataset=group_by_image(dataset).select([])
        )


def test_caption_evaluation_of_images_without_paths_writes_their_captions_without_paths(
    tmp_path, tokenizer, processor
):
    # Rows with an `image` column (no `image_path`) are captioned from their pixels, and their records say no path.
    images = datasets.Dataset.from_dict(
        {"image_id": [7, 8], "image": random_images(2, seed=4), "references": [["a dog"], ["a cat", "cats"]]}
    )
    model = quiet_model(tokenizer)
    trainer = ClipCapTrainer(
        model=model,
        args=training_args(tmp_path / "out"),
        caption_eval_dataset=images,
        processing_class=processor,
        generation_kwargs={"max_new_tokens": 3},
    )
    metrics = trainer.evaluate_captions()

    pixel_values = processor(images=images["image"])["pixel_values"]
    expected = processor.post_process_image_text_to_text(model.generate(pixel_values=pixel_values, max_new_tokens=3))
    assert metrics["eval_distinct_captions"] == len(set(expected))
    records = json.loads((tmp_path / "out/predictions/eval_step0.json").read_text())
    assert records == [
        {"image_id": 7, "caption": expected[0], "references": ["a dog"]},
        {"image_id": 8, "caption": expected[1], "references": ["a cat", "cats"]},
    ]


# The columns of `group_by_image` on embedded images, less those dropped.
EVAL_IMAGE_COLUMNS = {"image_id": [1, 2], "image_index": [0, 1], "image_path": ["a.png", "b.png"],
                      "references": [["a dog"], ["a cat"]]}


@pytest.mark.parametrize(
    "drop, with_embeds, message",
    [
        (["image_id"], True, r"^caption_eval_dataset lacks `image_id`; it needs one row per image \(see group_by_image"
         r"\) with `image_id`, `references` \(its reference captions\) and `image_index` \(its row of "
         r"caption_eval_embeds\)\. Its columns: \['image_index', 'image_path', 'references'\]\.$"),
        (["references", "image_index"], True, r"lacks `references` and `image_index` \(its row of caption_eval_embeds"),
        # Captioned from pixels: each row's image is its `pixel_values`, `image` or `image_path`.
        (["image_path"], False, r"lacks an image column: `pixel_values`, `image` or `image_path`; it needs one row "
         r"per image .* Its columns: \['image_id', 'image_index', 'references'\]\.$"),
    ],
)
def test_caption_evaluation_needs_the_columns_it_reads(tmp_path, tokenizer, processor, drop, with_embeds, message):
    images = datasets.Dataset.from_dict({name: rows for name, rows in EVAL_IMAGE_COLUMNS.items() if name not in drop})
    with pytest.raises(ValueError, match=message):
        ClipCapTrainer(
            model=quiet_model(tokenizer),
            args=training_args(tmp_path / "out"),
            caption_eval_dataset=images,
            caption_eval_embeds=torch.zeros(2, 24) if with_embeds else None,
            processing_class=processor,
        )


def test_a_model_captioning_everything_alike_is_reported(tmp_path, tokenizer, processor, embedded, caplog):
    dataset, table = embedded
    model = quiet_model(tokenizer)
    trainer = ClipCapTrainer(
        model=model,
        args=training_args(tmp_path / "out"),
        data_collator=ClipCapDataCollator(processor, image_embeds=table),
        caption_eval_dataset=group_by_image(dataset),
        caption_eval_embeds=torch.zeros_like(table),
        processing_class=processor,
        generation_kwargs={"max_new_tokens": 4},
    )
    with caplog.at_level("WARNING"):
        metrics = trainer.evaluate(eval_dataset=dataset)
    assert metrics["eval_distinct_captions"] == 1
    assert "gives all 4 evaluation images the same caption" in caplog.text


# ---------------------------------------------------------------- resume


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resuming_from_a_checkpoint_ends_with_the_weights_of_an_uninterrupted_run(
    tmp_path, tokenizer, processor, embedded
):
    dataset, table = embedded

    def run(name, callbacks=(), resume=None):
        model = quiet_model(tokenizer, dropout=0.1)  # dropout: the RNG state must be restored too
        trainer = ClipCapTrainer(
            model=model,
            args=training_args(
                tmp_path / name,
                max_steps=6,
                per_device_train_batch_size=2,
                save_strategy="steps",
                save_steps=3,
                learning_rate=5e-3,
            ),
            train_dataset=dataset,
            data_collator=ClipCapDataCollator(processor, image_embeds=table),
            callbacks=list(callbacks),
        )
        trainer.train(resume_from_checkpoint=resume)
        return model

    uninterrupted = run("full")
    interrupted = run("parts", callbacks=[StopAt(3)])
    assert os.listdir(tmp_path / "parts") == ["checkpoint-3"]
    resumed = run("parts", resume=str(tmp_path / "parts/checkpoint-3"))
    assert not all(
        torch.equal(a, b) for a, b in zip(interrupted.state_dict().values(), uninterrupted.state_dict().values())
    )
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------- the run: clipcap train, run_clipcap.py, torchrun


@pytest.fixture
def model_dir(tmp_path, tokenizer, processor):
    folder = tmp_path / "tiny"
    quiet_model(tokenizer).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def run_arguments(model_dir, caption_folder, output_dir, cache_dir, *extra):
    return [
        "--model_name_or_path",
        str(model_dir),
        "--dataset_format",
        "imagefolder",
        "--train_file",
        str(caption_folder),
        "--validation_file",
        str(caption_folder),
        "--output_dir",
        str(output_dir),
        "--embedding_cache_dir",
        str(cache_dir),
        "--do_train",
        "--do_eval",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "1e-3",
        "--save_strategy",
        "no",
        "--use_cpu",
        "--report_to",
        "none",
        "--generation_max_new_tokens",
        "4",
        "--disable_tqdm",
        "true",
        *extra,
    ]


def test_clipcap_train_trains_evaluates_saves_and_counts_truncated_captions(
    tmp_path, tokenizer, model_dir, caption_folder
):
    out = tmp_path / "out"
    # Batches grouped by the `length` column (without it the sampler would look for `input_ids` and fail); transformers
    # 5 renamed the option.
    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:
        grouping = ["--train_sampling_strategy", "group_by_length"]
    else:
        grouping = ["--group_by_length"]
    args = run_arguments(model_dir, caption_folder, out, tmp_path / "cache", "--max_caption_length", "12", *grouping)
    assert cli_main(["train", *args]) == 0
    results = json.loads((out / "all_results.json").read_text())
    captions = load_image_folder(caption_folder)["caption"]
    too_long = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 > 12 for c in captions)
    assert too_long == 4 and results["train_truncated_captions"] == too_long
    assert results["eval_distinct_captions"] >= 1 and "eval_loss" in results
    assert (out / "predictions/eval_step2.json").exists()
    loaded = ClipCapForConditionalGeneration.from_pretrained(out)
    assert loaded.config.prefix_length == 4


def test_an_evaluation_only_run_neither_embeds_nor_checks_the_training_images(tmp_path, model_dir, caption_folder):
    train_folder = tmp_path / "train"
    shutil.copytree(caption_folder, train_folder)
    (train_folder / "b.png").write_bytes(b"broken")  # would stop any pass that opens the training images
    args = run_arguments(model_dir, train_folder, tmp_path / "out", tmp_path / "cache")
    args[args.index("--validation_file") + 1] = str(caption_folder)
    args.remove("--do_train")
    metrics = main(args)
    assert "eval_loss" in metrics and "train_loss" not in metrics


def test_evaluation_in_a_run_captions_at_the_model_s_own_caption_length_as_clipcap_evaluate(
    tmp_path, tokenizer, caption_folder
):
    model_dir = tmp_path / "model"
    model = distinct_captioning_model(tokenizer)
    model.generation_config.max_new_tokens = 6  # as a converted or quickstart model sets its own
    model.save_pretrained(model_dir)
    tiny_processor(tokenizer).save_pretrained(model_dir)
    args = run_arguments(model_dir, caption_folder, tmp_path / "out", tmp_path / "cache")
    del args[args.index("--generation_max_new_tokens") : args.index("--generation_max_new_tokens") + 2]
    args.remove("--do_train")
    main(args)
    assert cli_main(["evaluate", "--model", str(model_dir), "--data", str(caption_folder), "--data-format",
                     "imagefolder", "--output-dir", str(tmp_path / "evaluated")]) == 0  # fmt: skip
    in_run = json.loads((tmp_path / "out/predictions/eval_step0.json").read_text())
    evaluated = json.loads((tmp_path / "evaluated/predictions.json").read_text())
    assert [row["caption"] for row in in_run] == [row["caption"] for row in evaluated]  # 30 tokens before, not 6


def test_an_unreadable_image_stops_the_run_before_training(tmp_path, model_dir, caption_folder):
    (caption_folder / "b.png").write_bytes(b"broken")
    out = tmp_path / "out"
    # The image is named by its file and its key (path, size, modification time).
    with pytest.raises(ValueError, match=r"images/b.png: UnidentifiedImageError.*\(key .*images/b.png\|6\|\d+\)"):
        main(run_arguments(model_dir, caption_folder, out, tmp_path / "cache"))
    assert not (out / "model.safetensors").exists()

    metrics = main(run_arguments(model_dir, caption_folder, out, tmp_path / "cache", "--on_bad_image", "skip"))
    assert metrics["train_samples"] == 5 and metrics["eval_samples"] == 5


def run_torchrun(tmp_path, processes, script, arguments):
    """Output of `torchrun --nproc_per_node PROCESSES SCRIPT ARGUMENTS...`, which must succeed."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        # --standalone picks a free port: a fixed one let a concurrent run on the same machine join this group.
        "--standalone",
        "--nproc_per_node",
        str(processes),
        str(script),
        *arguments,
    ]
    # CI=true makes transformers pass its records on to the root logger too, which once printed each of them twice.
    env = {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # A rank that aborts in native code then shows where its Python code was.
    env["PYTHONFAULTHANDLER"] = "1"
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    output = result.stdout + result.stderr
    # faulthandler's report (the stack of every thread) starts at "Fatal Python error" and is followed by a long
    # list of extension modules: show it rather than the end of the output.
    fatal = output.find("Fatal Python error")
    assert result.returncode == 0, output[fatal : fatal + 6000] if fatal >= 0 else output[-3000:]
    return output


def test_torchrun_two_processes_train_and_log_once(tmp_path, model_dir, caption_folder):
    out = tmp_path / "out"
    arguments = run_arguments(
        model_dir, caption_folder, out, tmp_path / "cache", "--ddp_backend", "gloo", "--logging_steps", "1"
    )
    output = run_torchrun(tmp_path, 2, REPO / "examples/run_clipcap.py", arguments)
    assert "world size: 2" in output
    assert output.count("***** Running training *****") == 1
    assert output.count("***** train metrics *****") == 1
    assert output.count("'train_runtime'") == 1
    assert output.count("Wrote 4 evaluation captions") == 1
    assert (out / "model.safetensors").exists()


def test_run_ends_its_process_group(tmp_path, model_dir, caption_folder):
    # A rank that leaves Python with its gloo group alive while another rank still works can abort ("terminate called
    # without an active exception", about 1 torchrun test in 200): the run ends the group itself.
    script = tmp_path / "run_and_report.py"
    script.write_text(
        "import torch.distributed as dist\n"
        "from clipcap_hf.training import main\n"
        "main()\n"
        "print('process group alive after the run:', dist.is_initialized())\n"
    )
    arguments = run_arguments(model_dir, caption_folder, tmp_path / "out", tmp_path / "cache", "--ddp_backend", "gloo")
    assert "process group alive after the run: False" in run_torchrun(tmp_path, 1, script, arguments)


def test_torchrun_processes_all_refuse_an_output_dir_another_run_holds(tmp_path, model_dir, caption_folder):
    # Process 0 alone takes the lock, and tells the others: they refuse with it rather than go on loading.
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "run_or_report.py"
    script.write_text(
        "import os\n"
        "from accelerate import PartialState\n"
        "from clipcap_hf.training import main\n"
        "try:\n"
        "    main()\n"
        "except ValueError as error:\n"
        "    print(f'rank {os.environ[\"RANK\"]} refused:', error, flush=True)\n"
        "    PartialState().destroy_process_group()\n"
    )
    arguments = run_arguments(model_dir, caption_folder, out, tmp_path / "cache", "--ddp_backend", "gloo")
    # Another run's main process (a fresh Python: this process imported torch and must not fork).
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / RUN_LOCK_NAME)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        output = run_torchrun(tmp_path, 2, script, arguments)
    finally:
        holder.communicate("", timeout=60)
    for rank in (0, 1):
        assert f"rank {rank} refused: --output_dir {out} is being written by another run" in output
    assert os.listdir(out) == [RUN_LOCK_NAME] and not (tmp_path / "cache").exists()


def test_lora_recipe_from_pretrained_parts_saves_base_adapters_and_merged_model(tmp_path, tokenizer, caption_folder):
    from peft import PeftConfig

    parts = quiet_model(tokenizer)
    parts.vision_model.save_pretrained(tmp_path / "clip")
    parts.language_model.save_pretrained(tmp_path / "gpt")
    tokenizer.save_pretrained(tmp_path / "gpt")
    out = tmp_path / "out"
    args = run_arguments(
        "unused",
        caption_folder,
        out,
        tmp_path / "cache",
        "--recipe",
        "lora",
        "--prefix_length",
        "4",
        "--learning_rate",
        "1e-2",
        "--warmup_steps",
        "0",
        "--lora_r",
        "4",
    )[2:]
    main(
        [
            "--vision_model_name_or_path",
            str(tmp_path / "clip"),
            "--text_model_name_or_path",
            str(tmp_path / "gpt"),
            *args,
        ]
    )

    assert PeftConfig.from_pretrained(out).base_model_name_or_path == str((out / "base_model").resolve())
    base = ClipCapForConditionalGeneration.from_pretrained(out / "base_model").eval()
    assert torch.equal(base.language_model.lm_head.weight, parts.language_model.lm_head.weight)
    adapted = load_lora_model(out).eval()
    merged = ClipCapForConditionalGeneration.from_pretrained(out / "merged").eval()
    x = torch.randn(2, 24, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[base.config.image_token_id] * 4 + [5, 6, 7], [base.config.image_token_id] * 4 + [8, 9, 10]])
    with torch.no_grad():
        expected = adapted(image_embeds=x, input_ids=ids).logits
        assert not torch.allclose(base(image_embeds=x, input_ids=ids).logits, expected, atol=1e-3)
        torch.testing.assert_close(merged(image_embeds=x, input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)

    # The run folder moved (adapter_config.json still records its old base_model path): it loads its own base, as
    # does a checkpoint folder of it, and a run continues from it.
    moved = tmp_path / "moved"
    out.rename(moved)
    checkpoint = moved / "checkpoint-7"
    checkpoint.mkdir()
    for file in moved.iterdir():  # a checkpoint holds the adapters and the processor
        if file.is_file():
            shutil.copy(file, checkpoint / file.name)
    continued, _ = build_model(ModelArguments(model_name_or_path=str(moved), use_lora=True))
    merge_lora(checkpoint, tmp_path / "merged-again")
    remerged = ClipCapForConditionalGeneration.from_pretrained(tmp_path / "merged-again").eval()
    with torch.no_grad():
        for reloaded in (load_lora_model(moved).eval(), load_lora_model(checkpoint).eval(), continued.eval(), remerged):
            torch.testing.assert_close(reloaded(image_embeds=x, input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_lora_base_is_the_recorded_model_even_beside_a_base_model_folder_an_earlier_run_left(tmp_path):
    from conftest import build_tokenizer
    from peft import LoraConfig

    from clipcap_hf.training.lora import lora_base_model

    tokenizer = build_tokenizer()
    out, pretrained = tmp_path / "out", tmp_path / "pretrained"
    tiny_model(tokenizer, seed=1).save_pretrained(out / "base_model")  # an earlier fresh LoRA run in `out`
    tiny_model(tokenizer, seed=2).save_pretrained(pretrained)
    LoraConfig(base_model_name_or_path=str(pretrained), target_modules=["c_attn"]).save_pretrained(out)
    assert lora_base_model(out) == str(pretrained)
    # A record naming this run's own base_model folder, still there, is that folder.
    LoraConfig(base_model_name_or_path=str(out / "base_model"), target_modules=["c_attn"]).save_pretrained(out)
    assert lora_base_model(out) == str(out / "base_model")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_caption_length", 0),
        ("max_caption_length", -1),
        ("generation_max_new_tokens", 0),
        ("generation_num_beams", 0),
        ("max_train_samples", 0),
        ("max_train_samples", -1),
        ("max_eval_samples", 0),
    ],
)
def test_data_arguments_reject_lengths_beams_and_sample_counts_below_one(field, value):
    with pytest.raises(ValueError, match=f"--{field} must be at least 1, got {value}"):
        DataArguments(**{field: value})


def test_data_arguments_check_caption_metrics_before_training():
    message = r"--eval_caption_metrics: Unknown caption metric\(s\) \['cidr'\]; choose from \['bl"
    with pytest.raises(ValueError, match=message):
        DataArguments(eval_caption_metrics="bleu,cidr")
    with mock.patch.dict(sys.modules, {"pycocoevalcap": None}):  # as if not installed
        with pytest.raises(ImportError, match=r"--eval_caption_metrics: .*pip install"):
            DataArguments(eval_caption_metrics="bleu")
    assert DataArguments(eval_caption_metrics="bleu, cider").caption_metrics == ["bleu", "cider"]


def test_checkpoints_hold_the_processor(tmp_path, model_dir, caption_folder):
    out = tmp_path / "out"
    saving = ("--save_strategy", "steps", "--save_steps", "2")
    main(run_arguments(model_dir, caption_folder, out, tmp_path / "cache", *saving))
    checkpoint = out / "checkpoint-2"
    expected = ClipCapProcessor.from_pretrained(model_dir)
    for processor in (ClipCapProcessor.from_pretrained(checkpoint), AutoProcessor.from_pretrained(checkpoint)):
        assert type(processor) is ClipCapProcessor
        assert processor.tokenizer.get_vocab() == expected.tokenizer.get_vocab()
        assert processor.image_processor.to_dict() == expected.image_processor.to_dict()


def test_lora_from_a_relative_model_folder_records_its_absolute_path_and_warns_of_a_stale_base_model_folder(
    tmp_path, model_dir, caption_folder, monkeypatch, caplog
):
    from peft import PeftConfig

    monkeypatch.chdir(tmp_path)
    extra = ("--recipe", "lora", "--save_merged_model", "false", "--lora_r", "2")
    (tmp_path / "out" / "base_model").mkdir(parents=True)  # left by an earlier fresh LoRA run into the folder
    with caplog.at_level(logging.WARNING):
        main(run_arguments(model_dir.name, caption_folder, "out", "cache", *extra))
    assert PeftConfig.from_pretrained(tmp_path / "out").base_model_name_or_path == str(model_dir)
    assert f"out/base_model is left by an earlier run: these adapters' base is {model_dir} " in caplog.text


@pytest.mark.skipif(
    "overwrite_output_dir" not in TrainingArguments.__dataclass_fields__,
    reason="transformers 5 has no --overwrite_output_dir",
)
def test_overwrite_output_dir_starts_afresh_instead_of_resuming(tmp_path, model_dir, caption_folder):
    out = tmp_path / "out"
    (out / "checkpoint-3").mkdir(parents=True)
    # A complete checkpoint's last file, of a run not yet at its end (--max_steps 2): a rerun resumes from it. (Its
    # optimizer's file only named: Trainer, which would read it, is replaced below.)
    (out / "checkpoint-3/trainer_state.json").write_text('{"global_step": 1}')
    (out / "checkpoint-3/optimizer.pt").write_bytes(b"")
    resumed_from = []

    class Stop(Exception):
        pass

    def record_and_stop(self, resume_from_checkpoint=None, **kwargs):
        resumed_from.append(resume_from_checkpoint)
        raise Stop

    with mock.patch.object(ClipCapTrainer, "train", record_and_stop):
        for extra in ((), ("--overwrite_output_dir",)):
            with pytest.raises(Stop):
                main(run_arguments(model_dir, caption_folder, out, tmp_path / "cache", *extra))
    assert resumed_from == [str(out / "checkpoint-3"), None]


def test_the_public_training_api_is_exported():
    import clipcap_hf.training as training

    assert {"ClipCapTrainer", "DataArguments", "ModelArguments", "load_lora_model", "main", "merge_lora"} <= set(
        training.__all__
    )
    assert all(hasattr(training, name) for name in training.__all__)


# ---------------------------------------------------------------- what the run refuses, and what it continues


def write_karpathy(path, images):
    records = [
        {"filename": name, "split": split, "cocoid": number, "sentences": [{"raw": caption}]}
        for number, (name, split, caption) in enumerate(images)
    ]
    path.write_text(json.dumps({"images": records}))


def test_a_karpathy_validation_file_evaluates_its_val_images(tmp_path, model_dir, caption_folder):
    path = tmp_path / "karpathy.json"
    write_karpathy(
        path, [("a.png", "val", "A dog runs."), ("b.png", "val", "People walk."), ("c.png", "test", "A man.")]
    )
    extra = ("--validation_format", "coco-karpathy", "--validation_image_root", str(caption_folder))
    args = run_arguments(model_dir, caption_folder, tmp_path / "out", tmp_path / "cache", *extra)
    args += ["--max_eval_samples", "1"]
    args[args.index("--validation_file") + 1] = str(path)
    assert main(args)["eval_samples"] == 1
    records = json.loads((tmp_path / "out/predictions/eval_step2.json").read_text())
    assert [(record["image_id"], record["references"]) for record in records] == [(0, ["A dog runs."])]

    write_karpathy(path, [("a.png", "train", "A dog runs."), ("c.png", "test", "A man.")])
    message = r"--validation_file: .*karpathy.json \(coco-karpathy\) has no images of split 'validation'"
    with pytest.raises(ValueError, match=message):
        main(args)
    # Karpathy's test split, by its name.
    assert main([*args, "--validation_split", "test"])["eval_samples"] == 1
    records = json.loads((tmp_path / "out/predictions/eval_step2.json").read_text())
    assert [(record["image_id"], record["references"]) for record in records] == [(1, ["A man."])]


@pytest.mark.parametrize(
    "extra, problems",
    [
        (
            ("--mapping_type", "transformer", "--prefix_length", "20", "--normalize_prefix", "true"),
            r"--mapping_type transformer \(the checkpoint's: mlp\); --prefix_length 20 \(the checkpoint's: 4\); "
            r"--normalize_prefix True \(the checkpoint's: False\)",
        ),
        (("--text_model_name_or_path", "gpt2-large"), "--text_model_name_or_path gpt2-large builds a new model"),
        (
            ("--recipe", "transformer_frozen"),
            r"--recipe transformer_frozen trains a transformer mapper \(the checkpoint's: mlp; set "
            r"--freeze_language_model or --use_lora without a recipe instead\)",
        ),
    ],
)
def test_architecture_options_the_checkpoint_does_not_have_are_refused(
    tmp_path, model_dir, caption_folder, extra, problems
):
    message = rf"--model_name_or_path .*tiny continues a checkpoint, whose architecture is fixed, but {problems}\. "
    with pytest.raises(ValueError, match=message + "Leave these options out"):
        main(run_arguments(model_dir, caption_folder, tmp_path / "out", tmp_path / "cache", *extra))


def test_architecture_options_that_match_the_checkpoint_are_accepted(tmp_path, model_dir, caption_folder):
    extra = ("--mapping_type", "mlp", "--prefix_length", "4", "--normalize_prefix", "false")
    metrics = main(run_arguments(model_dir, caption_folder, tmp_path / "out", tmp_path / "cache", *extra))
    assert metrics["train_samples"] == 7


def test_an_evaluation_set_left_empty_by_skipped_images_is_refused_before_training(
    tmp_path, model_dir, caption_folder
):
    eval_folder = tmp_path / "eval"
    eval_folder.mkdir()
    (eval_folder / "x.png").write_bytes(b"broken")
    (eval_folder / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "A dog."}) + "\n")
    out = tmp_path / "out"
    args = run_arguments(model_dir, caption_folder, out, tmp_path / "cache", "--on_bad_image", "skip")
    args[args.index("--validation_file") + 1] = str(eval_folder)
    message = r"No evaluation captions are left: every evaluation image was unreadable and skipped \(--on_bad_image"
    with pytest.raises(ValueError, match=message):
        main(args)
    assert not out.exists()


def test_captions_or_generation_beyond_the_language_model_context_are_refused_before_training(
    tmp_path, tokenizer, model_dir, caption_folder
):
    # The tiny language model has 128 positions and the checkpoint 4 prefix vectors: 124 caption tokens fit.
    long_caption = " ".join(["A dog runs on the beach."] * 40)
    assert len(tokenizer(long_caption)["input_ids"]) + 1 > 125
    with (caption_folder / "metadata.jsonl").open("a") as file:
        file.write(json.dumps({"file_name": "c.png", "text": long_caption}) + "\n")
    out, cache = tmp_path / "out", tmp_path / "cache"

    message = (
        r"--generation_max_new_tokens 125 with the 4 prefix vectors needs 129 positions, but the language model has "
        r"128 \(max_position_embeddings\). Set --generation_max_new_tokens to 124 or less."
    )
    with pytest.raises(ValueError, match=message):
        main(run_arguments(model_dir, caption_folder, out, cache, "--generation_max_new_tokens", "125"))
    assert not cache.exists()  # refused before any image was embedded

    message = (
        r"The longest caption has 125 tokens \(EOS included, after --max_caption_length 125\); with the 4 prefix "
        r"vectors that is 129 positions, but the language model has 128 \(max_position_embeddings\). Set "
        r"--max_caption_length to 124 or less."
    )
    with pytest.raises(ValueError, match=message):
        main(run_arguments(model_dir, caption_folder, out, cache, "--max_caption_length", "125"))
    assert not out.exists()
    # A stream's captions are not measured first: the cap itself must fit (the run stopped part-way before).
    message = (
        r"--max_caption_length 125 with the 4 prefix vectors allows 129 positions, but the language model has 128 "
        r"\(max_position_embeddings\), and a streamed source's captions are not measured before training: .* Set "
        r"--max_caption_length to 124 or less."
    )
    streaming = ("--streaming", "--max_caption_length", "125", "--eval_strategy", "no")
    with pytest.raises(ValueError, match=message):
        main(run_arguments(model_dir, caption_folder, out, cache, *streaming))
    assert not any(out.glob("checkpoint-*"))
    # At the limit the long caption trains, and is evaluated (the evaluation loss covers every caption).
    metrics = main(run_arguments(model_dir, caption_folder, out, cache, "--max_caption_length", "124"))
    assert metrics["train_truncated_captions"] == 1 and torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_a_checkpoint_without_the_optimizer_state_is_not_resumed_unless_asked(tmp_path, model_dir, caption_folder):
    import shutil

    out, cache = tmp_path / "out", tmp_path / "cache"
    args = run_arguments(model_dir, caption_folder, out, cache, "--save_only_model", "--eval_strategy", "no")
    args[args.index("--save_strategy") + 1] = "steps"
    args += ["--save_steps", "1"]
    main(args)
    shutil.rmtree(out / "checkpoint-2")  # as if killed after its first checkpoint
    message = (
        r"checkpoint-1 holds the model without the optimizer's state \(it was saved with --save_only_model\), so "
        r"resuming from it would restart the optimizer .* Resume from it anyway with --resume_from_checkpoint "
    )
    with pytest.raises(ValueError, match=message):
        main(args)
    assert not (out / "checkpoint-2").exists()
    assert main([*args, "--resume_from_checkpoint", str(out / "checkpoint-1")])["train_samples"] > 0
    assert (out / "checkpoint-2").is_dir()
    main(args)  # the run is over: a rerun finds its last checkpoint and trains nothing, as any finished run


def test_a_resume_with_another_number_of_processes_is_warned_of(tmp_path, model_dir, caption_folder, caplog):
    import shutil

    out, cache = tmp_path / "out", tmp_path / "cache"
    args = run_arguments(model_dir, caption_folder, out, cache, "--eval_strategy", "no")
    args[args.index("--save_strategy") + 1] = "steps"
    args += ["--save_steps", "1"]
    main(args)
    shutil.rmtree(out / "checkpoint-2")
    record = out / "checkpoint-1" / "clipcap_run_args.json"
    recorded = json.loads(record.read_text())
    assert recorded["world_size"] == 1
    record.write_text(json.dumps({**recorded, "world_size": 2}))  # as if trained by two processes
    with caplog.at_level("WARNING"):
        main(args)
    assert "trained by 2 process(es), with 1: each process trains its own share of every step's batch" in caplog.text
    assert (out / "checkpoint-2").is_dir()  # resumed all the same


def test_a_streamed_training_file_that_stops_reading_midway_is_named(tmp_path, model_dir):
    # Met by the Trainer's data loader once the first file's rows were trained on: pyarrow's bare ArrowInvalid, which
    # names no file.
    import pyarrow

    for index, image in enumerate(random_images(3)):
        image.save(tmp_path / f"{index}.png")
    line = lambda index: json.dumps({"image": f"{index}.png", "caption": f"A dog number {index}."}) + "\n"  # noqa: E731
    files = [tmp_path / "part0.jsonl", tmp_path / "part1.jsonl"]
    files[0].write_text(line(0) + line(1))
    files[1].write_text(line(2) + "{not json\n")
    args = run_arguments(model_dir, tmp_path, tmp_path / "out", tmp_path / "cache", "--streaming", "--image_root",
                         str(tmp_path), "--max_steps", "3")  # fmt: skip
    args[args.index("--train_file") + 1] = ",".join(map(str, files))
    for option in ("--dataset_format", "--validation_file", "--generation_max_new_tokens"):
        del args[args.index(option) : args.index(option) + 2]
    args.remove("--do_eval")
    message = (
        f"{files[1]} cannot be read as json data (line 2: ArrowInvalid: JSON parse error: Missing a name for object "
        "member.); fix or remove it."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$") as error:
        main(args)
    assert isinstance(error.value.__cause__, pyarrow.ArrowInvalid)  # the reader's own error, kept


def test_a_streamed_run_resumed_past_a_restart_of_its_stream_is_warned_of(tmp_path, model_dir, caption_folder, caplog):
    import shutil

    out, cache = tmp_path / "out", tmp_path / "cache"
    args = run_arguments(model_dir, caption_folder, out, cache, "--streaming", "--eval_strategy", "no")
    args[args.index("--save_strategy") + 1] = "steps"
    args[args.index("--max_steps") + 1] = "6"  # the folder's captions make 4 batches of 2: the stream starts again
    args += ["--save_steps", "1"]
    main(args)
    epochs = {step: json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["epoch"]
              for step in (4, 5)}  # fmt: skip
    assert epochs[4] < 1 <= epochs[5]
    for step in (5, 6):
        shutil.rmtree(out / f"checkpoint-{step}")
    with caplog.at_level("WARNING"):
        main(args)  # from checkpoint-4, within the first pass: exact, nothing to say
    assert "saved after its stream ran out and started again" not in caplog.text
    shutil.rmtree(out / "checkpoint-6")
    with caplog.at_level("WARNING"):
        main(args)  # from checkpoint-5
    assert "checkpoint-5, saved after its stream ran out and started again (epoch 1." in caplog.text


def test_a_lora_run_continues_training_its_adapters(tmp_path, model_dir, caption_folder):
    from peft import PeftConfig
    from safetensors.torch import load_file

    first, second, cache = tmp_path / "first", tmp_path / "second", tmp_path / "cache"
    lora = ("--recipe", "lora", "--save_merged_model", "false", "--lora_r", "2", "--learning_rate", "1e-2")
    main(run_arguments(model_dir, caption_folder, first, cache, *lora, "--warmup_steps", "0"))
    message = (
        r"--model_name_or_path .*first holds LoRA adapters \(adapter_config.json\). Add --use_lora \(or --recipe "
        r"lora\) to train those adapters further, or continue from a plain checkpoint: the merged model"
    )
    with pytest.raises(ValueError, match=message):
        main(run_arguments(first, caption_folder, second, cache))

    # Options for new adapters that differ from these adapters' own were ignored (logged at the info level).
    message = (
        r"^--lora_r 4 \(the adapters': 2\), --lora_target_modules c_fc \(the adapters': .*\): --model_name_or_path "
        r".*first holds LoRA adapters, which this run trains further as they are, so these options would be ignored"
    )
    with pytest.raises(ValueError, match=message):
        main(run_arguments(first, caption_folder, second, cache, *lora, "--lora_r", "4", "--lora_target_modules",
                           "c_fc", "--lora_dropout", "0.05"))  # fmt: skip
    assert not second.exists()
    # The adapters' own values (here --lora_r 2) may be given.
    main(run_arguments(first, caption_folder, second, cache, *lora, "--warmup_steps", "0"))
    assert PeftConfig.from_pretrained(second).base_model_name_or_path == str(model_dir)
    before, after = (load_file(folder / "adapter_model.safetensors") for folder in (first, second))
    assert before.keys() == after.keys()  # the same adapters, not a second set wrapped around them
    assert all(not torch.equal(before[name], after[name]) for name in before)


def test_an_eval_strategy_without_an_evaluation_source_is_refused_naming_it(tmp_path, model_dir, caption_folder):
    # TrainingArguments turns --do_eval on for it, which the refusal named though the user never gave it.
    args = run_arguments(model_dir, caption_folder, tmp_path / "out", tmp_path / "cache", "--eval_strategy", "steps")
    del args[args.index("--validation_file") : args.index("--validation_file") + 2]
    args.remove("--do_eval")
    message = (
        "--eval_strategy steps evaluates during training, but this run has no evaluation source: add "
        "--validation_file (or a coco-karpathy --train_file), or --dataset_name with --validation_split, or leave "
        "out --eval_strategy."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        main(args)
    assert not (tmp_path / "cache").exists()


def test_captioning_a_dataset_packs_each_weight_once_with_the_captions_of_plain_kernels(tokenizer, monkeypatch):
    import datasets

    from clipcap_hf import onednn
    from clipcap_hf.training import caption_dataset

    if not onednn.onednn_linear_available():
        pytest.skip("needs PyTorch with oneDNN on x86-64")
    monkeypatch.setenv(onednn.CPU_LINEAR_ENV, "onednn")
    model = tiny_model(tokenizer)
    processor = tiny_processor(tokenizer)
    image_embeds = torch.randn(5, model.config.prefix_dim, generator=torch.Generator().manual_seed(0))
    rows = datasets.Dataset.from_dict({"image_index": list(range(5))})

    first_row = rows.select([0])
    _, one_batch = packs_run(lambda: caption_dataset(model, processor, first_row, image_embeds, max_new_tokens=3))
    reusing = reuse_seen_by_generate(monkeypatch, model)
    captions, packs = packs_run(lambda: caption_dataset(model, processor, rows, image_embeds, 2, max_new_tokens=3))
    assert packs == one_batch > 0  # 3 batches, each weight packed once
    assert all("forward" not in vars(module) for module in model.modules())
    assert reusing == [on_glibc()] * 3 and not reuses_freed_memory()  # each batch reuses what the one before freed
    with mkldnn_disabled():
        assert caption_dataset(model, processor, rows, image_embeds, 2, max_new_tokens=3) == captions
    assert len(set(captions)) > 1


def test_training_builds_no_key_value_cache_unless_asked(tokenizer, processor):
    """A training step never reads the cache back; GPT-2 would otherwise copy every layer's keys and values into one."""
    model = quiet_model(tokenizer)
    batch = batch_for(processor, ["A dog runs on the beach.", "Two cats sleep!"])
    model.train()
    without = model(**batch)
    assert getattr(without, CACHE_NAME) is None
    with_cache = model(**batch, use_cache=True)
    assert getattr(with_cache, CACHE_NAME).get_seq_length() == batch["input_ids"].shape[1]
    torch.testing.assert_close(without.loss, with_cache.loss)


@pytest.mark.skipif(not on_glibc(), reason="sets glibc's malloc switches")
def test_the_trainer_trains_on_the_cpu_reusing_freed_memory(tmp_path, tokenizer, processor, embedded):
    dataset, table = embedded
    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(reuses_freed_memory())

    trainer = ClipCapTrainer(
        model=quiet_model(tokenizer),
        args=training_args(tmp_path / "out", max_steps=2),
        train_dataset=dataset,
        data_collator=ClipCapDataCollator(processor, image_embeds=table),
        callbacks=[Watch()],
    )
    trainer.train()
    assert seen == [True, True]
    assert not reuses_freed_memory()


def test_pushes_to_the_hub_leave_out_the_run_lock(tmp_path, model_dir, caption_folder, monkeypatch):
    import concurrent.futures

    import huggingface_hub
    import transformers.trainer
    from huggingface_hub.utils import filter_repo_objects

    uploaded = []

    def upload_folder(*args, folder_path, ignore_patterns=None, **kwargs):  # what the Hub would receive
        files = [str(path.relative_to(folder_path)) for path in Path(folder_path).rglob("*") if path.is_file()]
        uploaded.append(sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns)))
        done = concurrent.futures.Future()  # Trainer pushes checkpoints in the background, and waits for them
        done.set_result(None)
        return done

    def create_repo(*args, **kwargs):
        return huggingface_hub.RepoUrl("https://huggingface.co/someone/clipcap")

    for owner in (huggingface_hub.HfApi, transformers.trainer):  # transformers 5 calls HfApi; 4.57 the functions
        monkeypatch.setattr(owner, "upload_folder", upload_folder, raising=False)
        monkeypatch.setattr(owner, "create_repo", create_repo, raising=False)
    out = tmp_path / "out"
    args = run_arguments(model_dir, caption_folder, out, tmp_path / "cache", "--push_to_hub", "--hub_model_id",
                         "someone/clipcap", "--save_strategy", "steps", "--save_steps", "1")
    main(args)

    assert len(uploaded) == 3  # at each of the two saves, and the final model
    for files in uploaded:
        assert "config.json" in files and "model.safetensors" in files and RUN_LOCK_NAME not in files, files
    assert (out / RUN_LOCK_NAME).exists()  # there, and held, while the pushes ran
