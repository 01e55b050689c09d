"""`clipcap ablate`: a 2-run grid on the synthetic task at tiny size: the table, the figure, and run folders that load
and caption; finished runs are not trained again."""

import csv
import dataclasses
import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

import PIL.Image
import pytest
import torch

from clipcap_hf import ClipCapForConditionalGeneration, ClipCapProcessor
from clipcap_hf.commands import ablate as ablate_command
from clipcap_hf.commands import main
from clipcap_hf.evaluation.metrics import compute_caption_metrics
from clipcap_hf.training import ablation
from clipcap_hf.training.ablation import AblationConfig, run_ablation
from clipcap_hf.training.quickstart import QuickstartConfig, make_shapes_dataset

pytest.importorskip("pycocoevalcap")
pytest.importorskip("matplotlib")

TINY_SHAPES = QuickstartConfig(train_images_per_combination=1, test_images_per_combination=1, hidden_size=32,
                               max_steps=3, batch_size=16)


def tiny_grid(**overrides) -> AblationConfig:
    settings = {"prefix_lengths": (1, 3), "mapping_types": ("mlp",), "language_models": ("finetuned",),
                "max_steps": 3, "batch_size": 16, "plot_metrics": ("CIDEr",), "shapes": TINY_SHAPES, **overrides}
    return AblationConfig(**settings)


def must_not_train(*args, **kwargs):
    raise AssertionError("a finished run was trained again")


def too_few_positions(prefix_length, positions, longest, described=".*"):
    """The refusal of a prefix length that with the longest training caption (`longest` tokens) needs more than the
    language model's `positions`."""
    return (rf"Prefix lengths \[{prefix_length}\] \(--prefix-lengths\) leave too few positions for the captions: "
            rf"{described} has {positions} \(max_position_embeddings\), and the longest training caption takes "
            rf"{longest} \(EOS included; the runs cut captions at 40 tokens\)\. Give prefix lengths of "
            rf"{positions - longest} or less; nothing was trained\.$")


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("ablation")
    records = run_ablation(output_dir, tiny_grid(), verbose=False)
    return output_dir, records


def test_a_synthetic_grid_plots_the_task_s_own_scores(grid, tmp_path):
    output_dir, records = grid
    shutil.copytree(output_dir, tmp_path / "grid")
    plotted = tiny_grid(plot_metrics=("exact_match", "shape_accuracy"))
    assert run_ablation(tmp_path / "grid", plotted, verbose=False) == records  # its runs reused, plotted anew
    assert sorted(path.name for path in (tmp_path / "grid").glob("*.png")) == [
        "prefix_length_exact_match.png", "prefix_length_shape_accuracy.png"
    ]


def test_a_two_run_grid_writes_its_table_and_figure_and_every_run_captions(grid):
    output_dir, records = grid
    with open(output_dir / "results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["name"], row["mapping_type"], row["language_model"], row["prefix_length"]) for row in rows] == [
        ("clip-shapes-mlp-finetuned-prefix001", "mlp", "finetuned", "1"),
        ("clip-shapes-mlp-finetuned-prefix003", "mlp", "finetuned", "3"),
    ]
    markdown = (output_dir / "results.md").read_text().splitlines()
    assert markdown[0].startswith("| vision | mapper | LM | prefix | trainable params | train s | Bleu_1 |")
    assert [line.split(" | ")[:4] for line in markdown[2:]] == [
        ["| clip-shapes", "mlp", "finetuned", "1"], ["| clip-shapes", "mlp", "finetuned", "3"]
    ]
    with PIL.Image.open(output_dir / "prefix_length_CIDEr.png") as figure:
        assert (figure.format, figure.size) == ("PNG", (660, 456))

    # Every run folder loads and captions; the table's scores are those of the captions the saved model gives.
    evaluation = make_shapes_dataset(1, 1, seed=TINY_SHAPES.seed)["test_seen"]
    for row in rows:
        folder = output_dir / "runs" / row["name"]
        model = ClipCapForConditionalGeneration.from_pretrained(folder, trust_remote_code=False).eval()
        processor = ClipCapProcessor.from_pretrained(folder, trust_remote_code=False)
        assert model.config.prefix_length == int(row["prefix_length"])
        assert not any(parameter.requires_grad for parameter in model.vision_model.parameters())
        with torch.no_grad():
            generated = model.generate(**processor(images=evaluation["image"]))
        captions = processor.post_process_image_text_to_text(generated)
        assert all(captions)
        references = {index: [caption] for index, caption in enumerate(evaluation["caption"])}
        scores = compute_caption_metrics(dict(enumerate(captions)), references, metrics=["cider"])
        assert float(row["CIDEr"]) == pytest.approx(scores["CIDEr"], abs=1e-6)
        assert 0 <= float(row["exact_match"]) <= 1
    assert [record["scores"]["CIDEr"] for record in records] == [float(row["CIDEr"]) for row in rows]


def test_a_rerun_skips_finished_runs_and_refuses_another_budget(grid, monkeypatch):
    output_dir, records = grid
    (output_dir / "results.csv").unlink()

    monkeypatch.setattr(ablation, "train_and_score", must_not_train)
    monkeypatch.setattr(ablation, "run_quickstart", must_not_train)
    assert run_ablation(output_dir, tiny_grid(), verbose=False) == records
    assert (output_dir / "results.csv").is_file()  # the table is written again from the finished runs

    with pytest.raises(ValueError, match=r"base was trained with other settings \(.*'max_steps': 3.*, this grid's: "
                                         r".*'max_steps': 5.*\); use another output folder"):
        run_ablation(output_dir, tiny_grid(shapes=dataclasses.replace(TINY_SHAPES, max_steps=5)), verbose=False)
    with pytest.raises(ValueError, match=r"clip-shapes-mlp-finetuned-prefix001 was trained with another budget "
                                         r"\(.*'max_steps': 3.*, this grid's: .*'max_steps': 4.*\); use another"):
        run_ablation(output_dir, tiny_grid(max_steps=4), verbose=False)
    # The transformer mapper's depth is no part of an MLP run's budget, as earlier versions recorded it.
    assert run_ablation(output_dir, tiny_grid(mapping_num_layers=4), verbose=False) == records
    scores_path = output_dir / "runs" / records[0]["name"] / "scores.json"
    written = json.loads(scores_path.read_text())
    scores_path.write_text(json.dumps({**written, "budget": {**written["budget"], "mapping_num_layers": 2}}))
    try:
        reused = run_ablation(output_dir, tiny_grid(mapping_num_layers=4), verbose=False)
    finally:
        scores_path.write_text(json.dumps(written))  # the grid is the module's
    assert reused[0]["scores"] == records[0]["scores"]


def test_the_command_reuses_the_grid_and_checks_its_options(grid, capsys, monkeypatch):
    output_dir, _ = grid
    monkeypatch.setattr(ablation, "train_and_score", None)  # nothing may be trained: every run is finished
    # The command's synthetic task has the quickstart's dataset sizes; the grid's are tiny.
    monkeypatch.setattr(ablate_command, "QuickstartConfig",
                        lambda max_steps, seed: dataclasses.replace(TINY_SHAPES, max_steps=max_steps, seed=seed))
    options = ["--prefix-lengths", "1", "3", "--mapping-types", "mlp", "--language-models", "finetuned",
               "--max-steps", "3", "--batch-size", "16", "--base-steps", "3", "--plot-metrics", "CIDEr", "--quiet"]
    assert main(["ablate", "--output-dir", str(output_dir), *options]) == 0
    assert "results.md" in capsys.readouterr().out

    assert main(["ablate", "--output-dir", str(output_dir), "--prefix-lengths", "0"]) == 2
    assert "--prefix-lengths: must be at least 1, got 0" in capsys.readouterr().err
    assert main(["ablate", "--output-dir", str(output_dir), "--train-file", "captions.json"]) == 2
    assert "--train-file, --vision-models and --text-model go together" in capsys.readouterr().err
    assert main(["ablate", "--output-dir", str(output_dir), "--dataset-format", "karpathy"]) == 2
    assert "--dataset-format: invalid choice: 'karpathy'" in capsys.readouterr().err
    # Dataset options the chosen dataset cannot use are refused, not dropped.
    assert main(["ablate", "--output-dir", str(output_dir), "--validation-file", "val.json", "--image-root", "images",
                 "--dataset-format", "nocaps"]) == 2
    assert ("--validation-file, --dataset-format, --image-root describe a dataset of your own, which needs "
            "--train-file") in capsys.readouterr().err
    assert main(["ablate", "--output-dir", str(output_dir), "--train-file", "captions.json", "--vision-models", "clip",
                 "--text-model", "gpt2", "--base-steps", "3"]) == 2
    assert "--base-steps sets the synthetic task's base run, which a dataset of your own" in capsys.readouterr().err
    # Drawn empty once the whole grid had trained: the synthetic task's own scores.
    assert main(["ablate", "--output-dir", str(output_dir), "--train-file", "captions.json", "--vision-models", "clip",
                 "--text-model", "gpt2", "--plot-metrics", "CIDEr", "exact_match", "shape_accuracy"]) == 2
    assert ("`plot_metrics` (--plot-metrics) exact_match shape_accuracy: scores of the synthetic task, which a "
            "dataset of your own is not scored with") in capsys.readouterr().err


def test_a_quiet_grid_prints_no_training_logs_and_no_progress_bars(grid, tmp_path, capsys):
    import datasets
    from transformers.utils import logging as transformers_logging

    shutil.copytree(grid[0] / "base", tmp_path / "base")  # the base run is done: only the grid's one run trains
    capsys.readouterr()
    (record,) = run_ablation(tmp_path, tiny_grid(prefix_lengths=(1,)), verbose=False)
    printed = capsys.readouterr()
    assert record["train_loss"] > 0  # it trained
    # With its bars disabled, the Trainer would print each log dict ({'loss': ...}, {'train_runtime': ...}).
    assert "loss" not in printed.out and "train_runtime" not in printed.out
    assert "it/s" not in printed.err  # transformers' loading and saving bars, or the embedding bar
    # The libraries' bars are on again afterwards.
    assert transformers_logging.is_progress_bar_enabled() and not datasets.are_progress_bars_disabled()


def test_runs_are_scored_on_ptb_tokenized_captions_as_clipcap_evaluate_scores_them():
    # Case and punctuation do not count, as in `clipcap evaluate`'s scores: the captions below are the same words.
    scores = ablation.score_run(["a dog runs on the beach"], [["A dog runs on the beach."]],
                                extra_scores=lambda predictions, references: {"calls": len(predictions)})
    assert scores["Bleu_1"] == pytest.approx(1.0) and scores["ROUGE_L"] == pytest.approx(1.0)
    assert scores["calls"] == 1


def test_grid_options_are_checked():
    with pytest.raises(ValueError, match=r"`mapping_types` must be some of \('mlp', 'transformer'\), got \['lstm'\]"):
        AblationConfig(mapping_types=("lstm",))
    with pytest.raises(ValueError, match=r"`plot_metrics` must be some of .*, got \['BLEU'\]"):
        AblationConfig(plot_metrics=("BLEU",))
    with pytest.raises(ValueError, match="Give both the pretrained vision towers and the language model"):
        AblationConfig(vision_models=("openai/clip-vit-base-patch32",))
    # The budget is checked here for Python callers as the command's argparse types check it: `max_steps=0` would
    # have the Trainer train for epochs instead.
    with pytest.raises(ValueError, match=r"`prefix_lengths\[1\]` must be a positive integer, got 2.5"):
        AblationConfig(prefix_lengths=(1, 2.5))
    with pytest.raises(ValueError, match=r"`prefix_lengths` must hold at least one prefix length"):
        AblationConfig(prefix_lengths=())
    # A repeated value would train the same run twice and give the table and figures duplicate rows.
    with pytest.raises(ValueError, match=r"`prefix_lengths` holds 2 more than once \(\[2, 2, 1\]\): give each value"):
        AblationConfig(prefix_lengths=(2, 2, 1))
    with pytest.raises(ValueError, match=r"`mapping_types` holds 'mlp' more than once"):
        AblationConfig(mapping_types=("mlp", "transformer", "mlp"))
    with pytest.raises(ValueError, match=r"`language_models` holds 'frozen' more than once"):
        AblationConfig(language_models=("frozen", "frozen"))
    with pytest.raises(ValueError, match=r"`vision_models` holds 'clip' more than once"):
        AblationConfig(vision_models=("clip", "clip"), text_model="gpt2")
    with pytest.raises(ValueError, match=r"`max_steps` must be a positive integer, got 0"):
        AblationConfig(max_steps=0)
    with pytest.raises(ValueError, match=r"`learning_rate` must be positive, got -0.001"):
        AblationConfig(learning_rate=-1e-3)
    # One value where a list is meant: named, rather than read letter by letter (['m', 'l', 'p']) or failing bare.
    for name, value in (("mapping_types", "mlp"), ("language_models", "frozen"), ("plot_metrics", "CIDEr"),
                        ("prefix_lengths", 4)):
        with pytest.raises(ValueError, match=rf"^`{name}` must be a list, got {value!r}; give \[{value!r}\]\.$"):
            AblationConfig(**{name: value})
    # Scores of the synthetic task would be drawn empty for a dataset of your own, once the whole grid has trained.
    with pytest.raises(ValueError, match=r"^`plot_metrics` \(--plot-metrics\) exact_match: scores of the synthetic"):
        AblationConfig(vision_models=["clip"], text_model="gpt2", plot_metrics=("CIDEr", "exact_match"))


def test_the_command_refuses_a_seed_numpy_cannot_take(tmp_path, capsys):
    # Refused by name as the command line is read, as `clipcap quickstart --seed` is, not by numpy in the first run.
    assert main(["ablate", "--output-dir", str(tmp_path), "--seed", "-1"]) == 2
    assert "--seed: must be between 0 and 4294967295 (2**32 - 1), got -1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_matplotlib_is_imported_only_when_a_figure_is_drawn():
    # Checked in the source, not by importing in a fresh interpreter (which costs more than the whole grid here).
    import ast

    for module in (ablation, ablate_command):
        tree = ast.parse(Path(module.__file__).read_text())
        top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        names = [alias.name for node in top_level for alias in node.names]
        names += [node.module or "" for node in top_level if isinstance(node, ast.ImportFrom)]
        assert not [name for name in names if name.startswith("matplotlib")], module.__name__


def test_a_grid_over_two_vision_towers_on_a_dataset_of_your_own(caption_folder, tokenizer, tmp_path):
    from conftest import tiny_config
    from transformers import (
        CLIPVisionModelWithProjection,
        GPT2LMHeadModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from clipcap_hf import ClipCapImageProcessor
    from clipcap_hf.training.ablation import caption_task

    torch.manual_seed(0)
    config = tiny_config(tokenizer)
    CLIPVisionModelWithProjection(config.vision_config).save_pretrained(tmp_path / "clip")
    ClipCapImageProcessor(size=32).save_pretrained(tmp_path / "clip")
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, image_size=32, patch_size=8)).save_pretrained(
        tmp_path / "siglip"
    )
    GPT2LMHeadModel(config.text_config).save_pretrained(tmp_path / "text")
    tokenizer.save_pretrained(tmp_path / "text")
    towers = [str(tmp_path / "clip"), str(tmp_path / "siglip")]
    data = caption_task("imagefolder", str(caption_folder), validation_file=str(caption_folder))
    assert len(data.train) == 7 and [len(references) for references in data.evaluation["references"]] == [2, 2, 1, 2]

    grid = AblationConfig(prefix_lengths=(2,), mapping_types=("mlp",), language_models=("frozen",),
                          vision_models=towers, text_model=str(tmp_path / "text"), max_steps=2, batch_size=4,
                          plot_metrics=("Bleu_4",))
    records = run_ablation(tmp_path / "grid", grid, data, verbose=False)
    assert [record["name"] for record in records] == ["clip-mlp-frozen-prefix002", "siglip-mlp-frozen-prefix002"]
    # Frozen language model: the mapper is all that trains.
    mapper_size = (24 * 32 + 32) + (32 * 64 + 64)  # CLIP: 24-d embedding -> 32 -> 2 x 32
    assert records[0]["trainable_parameters"] == mapper_size
    loaded = ClipCapForConditionalGeneration.from_pretrained(tmp_path / "grid" / "runs" / records[1]["name"])
    assert (loaded.config.vision_config.model_type, loaded.config.vision_pooling) == ("siglip_vision_model", "pooled")
    with open(tmp_path / "grid" / "results.csv", newline="") as file:
        assert [row["vision_model"] for row in csv.DictReader(file)] == ["clip", "siglip"]
    assert (tmp_path / "grid" / "prefix_length_Bleu_4.png").is_file()


def test_towers_whose_runs_would_share_a_folder_are_refused():
    with pytest.raises(ValueError, match=r"The vision towers \['a/clip', 'b/clip/'\] end in the same name"):
        AblationConfig(vision_models=["a/clip", "b/clip/"], text_model="gpt2")
    with pytest.raises(ValueError, match=r"^`vision_models` must be a list, got 'a/clip'; give \['a/clip'\]\.$"):
        AblationConfig(vision_models="a/clip", text_model="gpt2")
    with pytest.raises(ValueError, match=r"^`vision_models` must name towers by Hub name or folder, got 3\.$"):
        AblationConfig(vision_models=[3], text_model="gpt2")
    # Paths name a tower as the strings the command gives.
    config = AblationConfig(vision_models=[Path("models/clip")], text_model=Path("models/gpt2"), plot_metrics=())
    assert (config.vision_models, config.text_model) == (["models/clip"], "models/gpt2")


def test_the_grid_takes_its_pretrained_parts_from_its_config_alone(tmp_path):
    # The dataset once named towers and a language model too, which the grid trained on whatever its config said.
    import datasets

    from clipcap_hf.training.ablation import AblationData

    rows = datasets.Dataset.from_dict({"caption": ["a red square"], "image_path": ["a.png"]})
    evaluation = datasets.Dataset.from_dict({"references": [["a red square"]], "image_path": ["a.png"]})
    with pytest.raises(TypeError, match="vision_models"):
        AblationData(train=rows, evaluation=evaluation, vision_models=["clip"], text_model="gpt2")
    data = AblationData(train=rows, evaluation=evaluation)
    with pytest.raises(ValueError, match=r"A dataset of your own needs the pretrained parts.*`vision_models` and "
                                         r"`text_model` \(--vision-models, --text-model\)"):
        run_ablation(tmp_path, AblationConfig(), data, verbose=False)
    with pytest.raises(ValueError, match=r"your own vision towers needs your dataset too"):
        run_ablation(tmp_path, AblationConfig(vision_models=["clip"], text_model="gpt2"), verbose=False)


def test_captions_of_one_image_file_share_its_embedding():
    import datasets

    from clipcap_hf.training.ablation import with_image_index

    rows = datasets.Dataset.from_dict({"image_path": ["a.png", "b.png", "a.png", "c.png", "b.png"],
                                       "caption": ["1", "2", "3", "4", "5"]})
    indexed, images = with_image_index(rows)
    assert indexed["image_index"] == [0, 1, 0, 2, 1]
    assert images["image_path"] == ["a.png", "b.png", "c.png"]


def test_a_finished_run_is_reused_only_from_the_same_pretrained_parts_and_data_and_scoring(
    tmp_path, monkeypatch, caplog
):
    import datasets

    from clipcap_hf.evaluation.metrics import caption_tokenization
    from clipcap_hf.training.ablation import (
        AblationData,
        AblationRun,
        budget,
        dataset_fingerprint,
        trained_from,
    )

    def grid_from(tower, text_model):
        return AblationConfig(prefix_lengths=(2,), mapping_types=("mlp",), language_models=("frozen",),
                              vision_models=[tower], text_model=text_model, plot_metrics=())

    image = str(tmp_path / "a.png")
    PIL.Image.new("RGB", (8, 8)).save(image)
    rows = datasets.Dataset.from_dict({"caption": ["a red square"], "image_path": [image]})
    data = AblationData(train=rows, evaluation=rows.rename_column("caption", "references").map(
        lambda row: {"references": [row["references"]]}))
    old = grid_from("models/old/clip", "models/gpt2-small")
    run = AblationRun("models/old/clip", "mlp", "frozen", 2)
    run_dir = tmp_path / "runs" / run.name
    run_dir.mkdir(parents=True)
    record = {"run": dataclasses.asdict(run), "budget": budget(old, run), "trainable_parameters": 1,
              "train_seconds": 1.0, "train_loss": 1.0, "scores": {"CIDEr": 0.5}, "samples": []}

    def write_record(**extra):
        (run_dir / "scores.json").write_text(json.dumps({**record, **extra}))

    monkeypatch.setattr(ablation, "train_and_score", must_not_train)
    monkeypatch.setattr(ablation, "_check_prefix_lengths", lambda *args: None)  # its models are names, not there
    # A run written before its pretrained parts and data were recorded: refused, naming what is missing.
    write_record()
    with pytest.raises(ValueError, match=r"scores.json has no `trained_from` record .*remove that run"):
        run_ablation(tmp_path, old, data, verbose=False)

    origin = trained_from(run, old, dataset_fingerprint(data))
    write_record(trained_from=origin, scoring=caption_tokenization())
    assert [row["scores"] for row in run_ablation(tmp_path, old, data, verbose=False)] == [{"CIDEr": 0.5}]
    # A run scored another way (an older clipcap_hf's untokenized captions, or the other PTB tokenizer) is trained
    # again rather than mixed into one table with runs scored this way.
    other_way = "ptb" if caption_tokenization() == "python-approximation" else "python-approximation"
    for scoring in ({}, {"scoring": other_way}):
        write_record(trained_from=origin, **scoring)
        retrained = {**record, "scores": {"CIDEr": 0.7}, "scoring": caption_tokenization()}
        with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger=ablation.logger.name):
            patch.setattr(ablation, "train_and_score", lambda *args, **kwargs: retrained)
            assert [row["scores"] for row in run_ablation(tmp_path, old, data, verbose=False)] == [{"CIDEr": 0.7}]
        assert f"{run.name}: finished before, but scored on captions tokenized " in caplog.text
        assert "training it again" in caplog.text
        caplog.clear()
    other_rows = datasets.Dataset.from_dict({"caption": ["a blue circle"], "image_path": [image]})
    changes = [
        (grid_from("models/NEW/clip", "models/gpt2-small"), data, "models/NEW/clip"),  # same last name, other tower
        (grid_from("models/old/clip", "models/gpt2-LARGE"), data, "models/gpt2-LARGE"),
        (old, AblationData(train=other_rows, evaluation=data.evaluation), dataset_fingerprint(
            AblationData(train=other_rows, evaluation=data.evaluation))),
    ]
    for config, changed_data, named in changes:
        with pytest.raises(ValueError, match=rf"{run.name} was trained from other pretrained parts or data "
                                             rf"\(.*, this grid's: .*{named}.*\); use another output folder"):
            run_ablation(tmp_path, config, changed_data, verbose=False)


def test_a_moved_grid_resumes_and_a_language_model_trained_again_is_refused(grid, tmp_path, monkeypatch):
    from transformers import GPT2LMHeadModel

    output_dir, records = grid
    moved = tmp_path / "moved"
    shutil.copytree(output_dir, moved)

    monkeypatch.setattr(ablation, "train_and_score", must_not_train)
    monkeypatch.setattr(ablation, "run_quickstart", must_not_train)
    # Its runs are matched to their starting models by content, not by the paths the folder had.
    assert run_ablation(moved, tiny_grid(), verbose=False) == records
    # The base's language model saved again with other weights: its runs did not start from it.
    language_model = GPT2LMHeadModel.from_pretrained(moved / "base" / "gpt2-shapes")
    with torch.no_grad():
        language_model.lm_head.weight.add_(0.01)
    language_model.save_pretrained(moved / "base" / "gpt2-shapes")
    with pytest.raises(ValueError, match=r"prefix001 was trained from other pretrained parts or data"):
        run_ablation(moved, tiny_grid(), verbose=False)


def test_a_base_export_stopped_part_way_is_written_again(grid, tmp_path, monkeypatch):
    output_dir, records = grid
    copy = tmp_path / "copy"
    shutil.copytree(output_dir, copy)
    shutil.rmtree(copy / "base" / "gpt2-shapes")
    saved = ablation.save_pretrained

    def stopped_after_the_tokenizer_config(folder, *parts):
        saved(folder, parts[0])
        (Path(folder) / "tokenizer_config.json").write_text("{}")
        raise KeyboardInterrupt  # as Ctrl-C, before the vocabulary files

    monkeypatch.setattr(ablation, "run_quickstart", None)  # the base run itself is finished
    with monkeypatch.context() as patch:
        patch.setattr(ablation, "save_pretrained", stopped_after_the_tokenizer_config)
        with pytest.raises(KeyboardInterrupt):
            run_ablation(copy, tiny_grid(), verbose=False)
    assert not (copy / "base" / "gpt2-shapes").exists()
    monkeypatch.setattr(ablation, "train_and_score", None)
    assert run_ablation(copy, tiny_grid(), verbose=False) == records  # the same model again: its runs reused


def test_a_grid_that_cannot_finish_is_refused_before_any_training(grid, tmp_path, monkeypatch):
    import sys

    output_dir, _ = grid
    copy = tmp_path / "copy"
    shutil.copytree(output_dir, copy)
    monkeypatch.setattr(ablation, "train_and_score", None)  # nothing may train
    positions = json.loads((copy / "base" / "gpt2-shapes" / "config.json").read_text())["n_positions"]
    longest = 8  # "a purple triangle in the bottom right" and EOS, a token each (docs/ablations.md)
    # A prefix that leaves no position at all, or too few for the longest caption: the run would fail part-way.
    for prefix_length in (positions, positions - longest + 1):
        with pytest.raises(ValueError, match=too_few_positions(prefix_length, positions, longest)):
            run_ablation(copy, tiny_grid(prefix_lengths=(1, prefix_length)), verbose=False)
    # Figures without matplotlib: refused before the base run is trained, not after the grid.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(ablation, "run_quickstart", None)
    with pytest.raises(ImportError, match=r"The ablation figures need matplotlib"):
        run_ablation(tmp_path / "new", tiny_grid(), verbose=False)


def test_runs_an_older_clipcap_hf_recorded_by_path_resume_in_place_and_are_not_called_other_parts_elsewhere(
    grid, tmp_path, monkeypatch, caplog
):
    import os

    output_dir, records = grid
    copy = tmp_path / "copy"
    shutil.copytree(output_dir, copy)

    def record_as_an_older_clipcap_hf(folder, **changes):
        # Before runs were matched by content, `trained_from` named each part by its absolute path (or Hub name).
        for scores_path in (folder / "runs").glob("*/scores.json"):
            record = json.loads(scores_path.read_text())
            record["trained_from"].update({"vision_model": os.path.abspath(folder / "base" / "clip-shapes"),
                                           "text_model": os.path.abspath(folder / "base" / "gpt2-shapes"), **changes})
            scores_path.write_text(json.dumps(record))

    record_as_an_older_clipcap_hf(copy)
    monkeypatch.setattr(ablation, "train_and_score", must_not_train)
    monkeypatch.setattr(ablation, "run_quickstart", must_not_train)
    # Where it was written, the grid resumes as that version resumed it: its parts are at the recorded paths.
    with caplog.at_level(logging.WARNING, logger=ablation.logger.name):
        resumed = run_ablation(copy, tiny_grid(), verbose=False)
    assert [(record["name"], record["scores"]) for record in resumed] == [
        (record["name"], record["scores"]) for record in records
    ]
    assert "clip-shapes-mlp-finetuned-prefix001: reused on an older clipcap_hf's record" in caplog.text

    # Moved, its parts are at other paths: nothing tells whether they are the same models, which is said, not that
    # the run was trained from other parts.
    moved = tmp_path / "moved"
    shutil.move(copy, moved)
    with pytest.raises(ValueError, match=r"prefix001/scores.json records `trained_from` as an older clipcap_hf did, "
                                         r"by the pretrained parts' paths or Hub names, not by their content \(.*copy"
                                         r"/base/clip-shapes.*, this grid's: .*moved/base/clip-shapes.*\); as they "
                                         r"differ, it cannot be verified .* Run the grid with the parts the record "
                                         r"names"):
        run_ablation(moved, tiny_grid(), verbose=False)
    # Another dataset is still another origin, however the parts were recorded.
    record_as_an_older_clipcap_hf(moved, dataset="0" * 64)
    with pytest.raises(ValueError, match=r"prefix001 was trained from other pretrained parts or data"):
        run_ablation(moved, tiny_grid(), verbose=False)


def test_pretrained_parts_named_from_the_home_folder_are_checked_and_trained_from(
    caption_folder, tokenizer, tmp_path, monkeypatch
):
    from conftest import tiny_config
    from transformers import CLIPVisionModelWithProjection, GPT2LMHeadModel

    from clipcap_hf import ClipCapImageProcessor
    from clipcap_hf.training.ablation import caption_task

    monkeypatch.setenv("HOME", str(tmp_path))
    torch.manual_seed(0)
    config = tiny_config(tokenizer)
    CLIPVisionModelWithProjection(config.vision_config).save_pretrained(tmp_path / "clip")
    ClipCapImageProcessor(size=32).save_pretrained(tmp_path / "clip")
    GPT2LMHeadModel(config.text_config).save_pretrained(tmp_path / "text")
    tokenizer.save_pretrained(tmp_path / "text")
    data = caption_task("imagefolder", str(caption_folder), validation_file=str(caption_folder))

    def grid(*prefix_lengths):
        return AblationConfig(prefix_lengths=prefix_lengths, mapping_types=("mlp",), language_models=("frozen",),
                              vision_models=["~/clip"], text_model="~/text", max_steps=1, batch_size=4,
                              plot_metrics=())

    # `~` is expanded as training expands it (transformers does not): the language model's positions are read.
    positions = config.text_config.n_positions
    with monkeypatch.context() as patch:
        patch.setattr(ablation, "train_and_score", must_not_train)
        longest = max(len(tokenizer(caption)["input_ids"]) + 1 for caption in data.train["caption"])  # EOS too
        refused = too_few_positions(positions, positions, longest, "the language model ~/text")
        with pytest.raises(ValueError, match=refused):
            run_ablation(tmp_path / "grid", grid(2, positions), data, verbose=False)
    (record,) = run_ablation(tmp_path / "grid", grid(2), data, verbose=False)
    assert record["name"] == "clip-mlp-frozen-prefix002"
    monkeypatch.setattr(ablation, "train_and_score", must_not_train)
    assert run_ablation(tmp_path / "grid", grid(2), data, verbose=False) == [record]


def test_a_fresh_synthetic_grid_refuses_its_prefix_lengths_before_the_base_run_trains(grid, tmp_path, monkeypatch):
    class BaseTrained(Exception):
        pass

    def train_the_base(*args, **kwargs):
        raise BaseTrained

    positions = json.loads((grid[0] / "base" / "gpt2-shapes" / "config.json").read_text())["n_positions"]
    tokenizer = ClipCapProcessor.from_pretrained(grid[0] / "base").tokenizer  # the one the base run learnt
    captions = make_shapes_dataset(1, 1)["train"]["caption"]
    longest = max(len(tokenizer(caption)["input_ids"]) + 1 for caption in captions)  # EOS too
    assert longest == 8  # docs/ablations.md
    monkeypatch.setattr(ablation, "run_quickstart", train_the_base)
    described = r"the synthetic task's language model \(which the quickstart trains into .*/new/base\)"
    for prefix_length in (positions, positions - longest + 1):
        with pytest.raises(ValueError, match=too_few_positions(prefix_length, positions, longest, described)):
            run_ablation(tmp_path / "new", tiny_grid(prefix_lengths=(1, prefix_length)), verbose=False)
    assert not (tmp_path / "new" / "base").exists()
    # Prefix lengths it can take go on to train the base, as do longer ones with captions cut to fit.
    with pytest.raises(BaseTrained):
        run_ablation(tmp_path / "new", tiny_grid(prefix_lengths=(1, positions - longest)), verbose=False)
    with pytest.raises(BaseTrained):
        cut = tiny_grid(prefix_lengths=(1, positions - 4), max_caption_length=4)
        run_ablation(tmp_path / "new", cut, verbose=False)


def test_a_grid_on_a_dataset_of_your_own_refuses_a_prefix_its_captions_leave_no_room_for_before_any_run(
    caption_folder, tokenizer, tmp_path, monkeypatch
):
    from conftest import tiny_config
    from transformers import CLIPVisionModelWithProjection, GPT2LMHeadModel

    from clipcap_hf import ClipCapImageProcessor
    from clipcap_hf.training.ablation import caption_task

    data = caption_task("imagefolder", str(caption_folder), validation_file=str(caption_folder))
    longest = max(len(tokenizer(caption)["input_ids"]) + 1 for caption in data.train["caption"])  # EOS too
    positions = longest + 3  # room for a prefix of 3
    torch.manual_seed(0)
    config = tiny_config(tokenizer)
    config.text_config.n_positions = positions
    CLIPVisionModelWithProjection(config.vision_config).save_pretrained(tmp_path / "clip")
    ClipCapImageProcessor(size=32).save_pretrained(tmp_path / "clip")
    GPT2LMHeadModel(config.text_config).save_pretrained(tmp_path / "text")
    tokenizer.save_pretrained(tmp_path / "text")

    def grid(*prefix_lengths):
        return AblationConfig(prefix_lengths=prefix_lengths, mapping_types=("mlp",), language_models=("frozen",),
                              vision_models=[str(tmp_path / "clip")], text_model=str(tmp_path / "text"), max_steps=1,
                              batch_size=8, plot_metrics=())

    with monkeypatch.context() as patch:
        patch.setattr(ablation, "train_and_score", must_not_train)
        refused = too_few_positions(4, positions, longest, re.escape(f"the language model {tmp_path}/text"))
        with pytest.raises(ValueError, match=refused):
            run_ablation(tmp_path / "grid", grid(1, 4), data, verbose=False)
    assert not (tmp_path / "grid" / "runs").exists()
    # The longest prefix that fits trains on every caption, the longest one included.
    (record,) = run_ablation(tmp_path / "grid", grid(3), data, verbose=False)
    assert record["name"] == "clip-mlp-frozen-prefix003"


def rows_only_fingerprint(data) -> str:
    """The dataset fingerprint an older clipcap_hf recorded: the training and evaluation rows' Arrow stream alone."""
    import hashlib

    import pyarrow as pa

    hasher = hashlib.sha256()
    for rows in (data.train, data.evaluation):
        sink = pa.BufferOutputStream()
        table = rows.with_format("arrow")[:]
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        hasher.update(sink.getvalue().to_pybytes())
    return hasher.hexdigest()


def test_a_finished_run_is_refused_once_its_image_files_are_replaced_or_read_from_another_folder(
    tmp_path, monkeypatch, caplog
):
    import datasets

    from clipcap_hf.evaluation.metrics import caption_tokenization
    from clipcap_hf.training.ablation import AblationData, AblationRun, budget, dataset_fingerprint, trained_from

    def write_images(folder, colour, mtime_ns):
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("a.png", "b.png"):
            PIL.Image.new("RGB", (8, 8), colour).save(folder / name, compress_level=0)  # one size for any colour
            os.utime(folder / name, ns=(mtime_ns, mtime_ns))

    # Relative paths, as a relative --image-root gives them: they start from the working folder.
    write_images(tmp_path / "here" / "imgs", "red", 10**18)
    write_images(tmp_path / "there" / "imgs", "blue", 2 * 10**18)
    (tmp_path / "nowhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    train = datasets.Dataset.from_dict({"caption": ["a red square", "a red disc"],
                                        "image_path": ["imgs/a.png", "imgs/b.png"]})
    evaluation = datasets.Dataset.from_dict({"image_id": [4], "references": [["a red disc"]],
                                             "image_path": ["imgs/b.png"]})
    data = AblationData(train=train, evaluation=evaluation)
    config = AblationConfig(prefix_lengths=(2,), mapping_types=("mlp",), language_models=("frozen",),
                            vision_models=["models/clip"], text_model="models/gpt2", plot_metrics=())
    run = AblationRun("models/clip", "mlp", "frozen", 2)
    run_dir = tmp_path / "grid" / "runs" / run.name
    run_dir.mkdir(parents=True)
    record = {"run": dataclasses.asdict(run), "budget": budget(config, run), "trainable_parameters": 1,
              "train_seconds": 1.0, "train_loss": 1.0, "scores": {"CIDEr": 0.5}, "samples": [],
              "scoring": caption_tokenization()}
    origin = trained_from(run, config, dataset_fingerprint(data))
    (run_dir / "scores.json").write_text(json.dumps({**record, "trained_from": origin}))
    monkeypatch.setattr(ablation, "train_and_score", must_not_train)
    monkeypatch.setattr(ablation, "_check_prefix_lengths", lambda *args: None)  # its models are names, not there
    assert [row["scores"] for row in run_ablation(tmp_path / "grid", config, data, verbose=False)] == [{"CIDEr": 0.5}]

    other_data = rf"{run.name} was trained from other pretrained parts or data \(.*, this grid's: .*\); use another"
    # The same relative paths read from another working folder: other pictures.
    monkeypatch.chdir(tmp_path / "there")
    with pytest.raises(ValueError, match=other_data):
        run_ablation(tmp_path / "grid", config, data, verbose=False)
    # Every file replaced in place by another picture of the same size: the rows are the same, the images are not.
    monkeypatch.chdir(tmp_path / "here")
    size = os.path.getsize("imgs/a.png")
    write_images(tmp_path / "here" / "imgs", "green", 3 * 10**18)
    assert os.path.getsize("imgs/a.png") == size
    with pytest.raises(ValueError, match=other_data):
        run_ablation(tmp_path / "grid", config, data, verbose=False)
    # Where the files are not, the first missing one is named, with the fix.
    monkeypatch.chdir(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=re.escape(
        f"imgs/a.png: no such image file (row 0 of the train rows' `image_path`, {tmp_path}/nowhere/imgs/a.png). "
        "Paths that do not start with / start from the working folder: give the dataset's image folder (--image-root) "
        "as an absolute path, or run from the folder they start from."
    )):
        run_ablation(tmp_path / "grid", config, data, verbose=False)

    # A run an older clipcap_hf recorded by the rows alone cannot be checked against the files: trained again, with a
    # warning, and not refused as a run on other data.
    monkeypatch.chdir(tmp_path / "here")
    older_origin = trained_from(run, config, rows_only_fingerprint(data))
    (run_dir / "scores.json").write_text(json.dumps({**record, "trained_from": older_origin}))
    retrained = {**record, "scores": {"CIDEr": 0.7}}
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING, logger=ablation.logger.name):
        patch.setattr(ablation, "train_and_score", lambda *args, **kwargs: retrained)
        assert [row["scores"] for row in run_ablation(tmp_path / "grid", config, data, verbose=False)] == [
            {"CIDEr": 0.7}
        ]
    warning = (f"{run.name}: finished before, but its record identifies the dataset by its rows only (an older "
               "clipcap_hf), not by its image files, which may have been replaced since; training it again.")
    assert warning in caplog.text
    # ...unless it started from other pretrained parts: refused as before, not trained over.
    other_parts = {**older_origin, "text_model": "models/gpt2-large"}
    (run_dir / "scores.json").write_text(json.dumps({**record, "trained_from": other_parts}))
    with pytest.raises(ValueError, match=rf"{run.name} was trained from other pretrained parts or data"):
        run_ablation(tmp_path / "grid", config, data, verbose=False)
    # Rows that hold their images (the synthetic task's) keep the fingerprint they had: their runs are reused.
    in_rows = datasets.Dataset.from_dict({"caption": ["a red square"], "image": [PIL.Image.new("RGB", (8, 8))]})
    with_references = in_rows.rename_column("caption", "references").map(lambda row: {"references": ["a"]})
    held = AblationData(train=in_rows, evaluation=with_references)
    assert dataset_fingerprint(held) == rows_only_fingerprint(held)


def test_a_bad_dataset_is_refused_when_given_naming_the_fix():
    import datasets

    from clipcap_hf.data import group_by_image
    from clipcap_hf.training.ablation import AblationData

    rows = datasets.Dataset.from_dict({"image_id": [4, 4, 5, 6], "image_path": ["a.png", "a.png", "b.png", "c.png"],
                                       "caption": ["a red square", "a square", "a blue disc", "a cross"]})
    grouped = group_by_image(rows)
    AblationData(train=rows, evaluation=grouped)  # the right shape
    with pytest.raises(ValueError, match=re.escape(
        "The evaluation rows (`AblationData.evaluation`) have no `references` column (columns ['image_id', "
        "'image_path', 'caption']): group the evaluation rows by image with `clipcap_hf.data.group_by_image`, which "
        "gathers each image's captions into `references`."
    )):
        AblationData(train=rows, evaluation=rows)
    with pytest.raises(ValueError, match=re.escape(
        "The train rows (`AblationData.train`) have no `caption` column (columns ['image_id', 'image_path', 'text']): "
        "give each row its caption."
    )):
        AblationData(train=rows.rename_column("caption", "text"), evaluation=grouped)
    with pytest.raises(ValueError, match=re.escape(
        "The train rows (`AblationData.train`) have no image: give them an `image` or `image_path` column (columns "
        "['image_id', 'caption'])."
    )):
        AblationData(train=rows.remove_columns("image_path"), evaluation=grouped)
    # Images without references are named by their image ids, not by their rows' positions.
    no_references = grouped.map(lambda row: {"references": [] if row["image_id"] in (4, 6) else row["references"]})
    with pytest.raises(ValueError, match=re.escape(
        "2 of the 3 evaluation images (image ids [4, 6]) have no reference captions (`references` must be a non-empty "
        "list of captions per image): leave those images out of the evaluation rows or give them captions."
    )):
        AblationData(train=rows, evaluation=no_references)
    with pytest.raises(ValueError, match=re.escape("(rows [1]) have no reference captions")):
        AblationData(train=rows, evaluation=no_references.remove_columns("image_id").select([1, 0]))
    with pytest.raises(ValueError, match=re.escape(
        "The evaluation rows hold the image id 5 more than once: give one row per image "
        "(`clipcap_hf.data.group_by_image` gathers an image's captions into its `references`)."
    )):
        AblationData(train=rows, evaluation=grouped.select([0, 1, 1]))


def test_runs_are_scored_by_image_id():
    from clipcap_hf.training.ablation import score_run

    with pytest.warns(UserWarning, match=re.escape("1 of 2 predictions are empty (image ids: 9)")):
        scores = score_run(["a red square", ""], [["a red square"], ["a blue disc"]], image_ids=[4, 9])
    # Its 3 words right, with the brevity penalty of 3 words for references of 6: exp(1 - 6 / 3).
    assert scores["Bleu_1"] == pytest.approx(math.exp(-1))


def test_a_run_whose_scoring_fails_keeps_its_trained_model(grid, tmp_path, monkeypatch):
    output_dir, _ = grid
    shutil.copytree(output_dir / "base", tmp_path / "base")

    def failing_score(*args, **kwargs):
        raise RuntimeError("scoring failed")

    monkeypatch.setattr(ablation, "score_run", failing_score)
    monkeypatch.setattr(ablation, "run_quickstart", must_not_train)
    with pytest.raises(RuntimeError, match="scoring failed"):
        run_ablation(tmp_path, tiny_grid(prefix_lengths=(2,)), verbose=False)
    run_dir = tmp_path / "runs" / "clip-shapes-mlp-finetuned-prefix002"
    assert not (run_dir / "scores.json").exists()  # not finished: a rerun trains it again
    model = ClipCapForConditionalGeneration.from_pretrained(run_dir, trust_remote_code=False)
    assert model.config.prefix_length == 2
    assert ClipCapProcessor.from_pretrained(run_dir, trust_remote_code=False).num_image_tokens == 2


def test_a_rerun_removes_the_figures_of_metrics_no_longer_plotted_and_figures_are_written_whole(
    grid, tmp_path, monkeypatch
):
    import matplotlib.figure

    output_dir, records = grid
    copy = tmp_path / "copy"
    shutil.copytree(output_dir, copy)
    monkeypatch.setattr(ablation, "train_and_score", must_not_train)
    assert run_ablation(copy, tiny_grid(plot_metrics=("CIDEr", "Bleu_4")), verbose=False) == records
    assert sorted(path.name for path in copy.glob("*.png")) == ["prefix_length_Bleu_4.png", "prefix_length_CIDEr.png"]
    (copy / "prefix_length_mine.png").write_bytes(b"the user's")  # not a metric's: not the grid's to remove
    run_ablation(copy, tiny_grid(plot_metrics=("CIDEr",)), verbose=False)
    assert sorted(path.name for path in copy.glob("*.png")) == ["prefix_length_CIDEr.png", "prefix_length_mine.png"]
    assert (copy / "prefix_length_mine.png").read_bytes() == b"the user's"

    # A figure that fails part-way leaves the earlier one as it was, and no temporary file.
    earlier = (copy / "prefix_length_CIDEr.png").read_bytes()

    def failing_savefig(self, target, **kwargs):
        target.write(b"\x89PNG half") if hasattr(target, "write") else Path(target).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", failing_savefig)
    with pytest.raises(OSError, match="disk full"):
        run_ablation(copy, tiny_grid(plot_metrics=("CIDEr",)), verbose=False)
    assert (copy / "prefix_length_CIDEr.png").read_bytes() == earlier
    assert sorted(path.name for path in copy.iterdir() if path.name.startswith(".")) == []
