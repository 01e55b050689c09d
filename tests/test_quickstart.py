"""`clipcap quickstart`: the synthetic shapes dataset, and a short training run that must learn."""

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import pipeline

from clipcap_hf import ClipCapForConditionalGeneration, ClipCapProcessor
from clipcap_hf.commands import main as cli_main
from clipcap_hf.training.quickstart import (
    COLOURS,
    POSITIONS,
    SHAPES,
    QuickstartConfig,
    is_held_out,
    make_shapes_dataset,
    print_report,
    render_shape,
    run_quickstart,
    score_captions,
)

# A run of seconds: one image per combination, two steps.
TINY_RUN = QuickstartConfig(train_images_per_combination=1, test_images_per_combination=1, max_steps=2, batch_size=8)


def attributes(caption):
    words = caption.split(" in the ")
    colour, shape = words[0].split()[1:]
    return colour, shape, words[1]


def test_test_split_holds_only_unseen_combinations_of_seen_attribute_pairs():
    splits = make_shapes_dataset(train_images_per_combination=2, test_images_per_combination=1)
    train = {attributes(c) for c in splits["train"]["caption"]}
    test = {attributes(c) for c in splits["test"]["caption"]}
    assert len(train) == 96 and len(test) == 24 and not train & test
    assert len(train | test) == len(COLOURS) * len(SHAPES) * len(POSITIONS)
    assert len(splits["train"]) == 192 and len(splits["test"]) == 24
    assert {attributes(c) for c in splits["test_seen"]["caption"]} == train and len(splits["test_seen"]) == 96
    for colour, shape, position in test:
        # Each pair of the held-out combination appears in training; only the triple is new.
        assert any(c == colour and s == shape for c, s, _ in train)
        assert any(c == colour and p == position for c, _, p in train)
        assert any(s == shape and p == position for _, s, p in train)
    assert all(is_held_out(*combination) for combination in test)


def test_shapes_are_drawn_in_their_colour_and_place():
    rng = np.random.default_rng(0)
    image = np.asarray(render_shape("red", "square", "top left", rng, size=32)).astype(int)
    red = (image[..., 0] > 150) & (image[..., 1] < 100) & (image[..., 2] < 100)
    rows, columns = np.nonzero(red)
    assert red.sum() > 30
    assert rows.mean() < 12 and columns.mean() < 12  # the top-left quarter
    same = np.asarray(render_shape("red", "square", "top left", np.random.default_rng(0), size=32))
    assert np.array_equal(image, same)


def test_score_captions():
    references = ["a red ring in the top left", "a blue square in the center"]
    scores = score_captions(["a red ring in the top right", "a blue square in the center"], references)
    assert scores["exact_match"] == 0.5
    assert (scores["colour_accuracy"], scores["shape_accuracy"], scores["position_accuracy"]) == (1.0, 1.0, 0.5)
    assert score_captions(["a red", "a"], references)["shape_accuracy"] == 0.0


@pytest.mark.parametrize("max_steps", ["0", "-5"])
def test_max_steps_below_one_is_rejected_before_training(tmp_path, capsys, monkeypatch, max_steps):
    monkeypatch.setattr("clipcap_hf.commands.quickstart.run_quickstart", lambda *args: pytest.fail("quickstart ran"))
    assert cli_main(["quickstart", "--output-dir", str(tmp_path), "--max-steps", max_steps]) == 2
    assert f"argument --max-steps: must be at least 1, got {max_steps}" in capsys.readouterr().err


def test_a_folder_with_other_files_is_refused_before_training(tmp_path, capsys, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    monkeypatch.setattr(
        "clipcap_hf.training.quickstart.make_shapes_dataset", lambda *args: pytest.fail("training started")
    )
    assert cli_main(["quickstart", "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"clipcap quickstart: error: {out} is not empty; choose another folder, remove it, or pass overwrite=True "
        "(--overwrite) to replace the model in it.\n"
    )
    assert cli_main(["quickstart", "--output-dir", str(out), "--overwrite"]) == 2
    assert capsys.readouterr().err == (
        f"clipcap quickstart: error: Refusing to write into {out}: overwrite=True (--overwrite) only writes over a "
        f"ClipCap model, and {out / 'config.json'} does not say model_type 'clipcap'. Remove it yourself or "
        "choose another folder.\n"
    )
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "my notes"
    assert cli_main(["quickstart", "--output-dir", str(out / "notes.txt")]) == 2
    assert capsys.readouterr().err == (
        f"clipcap quickstart: error: --output-dir: {out / 'notes.txt'} is a file; name a folder to save the model in.\n"
    )


def test_an_output_dir_that_cannot_be_created_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        "clipcap_hf.training.quickstart.make_shapes_dataset", lambda *args: pytest.fail("training started")
    )
    note = tmp_path / "note.txt"
    note.write_text("x")
    assert cli_main(["quickstart", "--output-dir", str(note / "model" / "deeper")]) == 2
    assert capsys.readouterr().err == (
        f"clipcap quickstart: error: --output-dir: {note / 'model' / 'deeper'} cannot be created: {note} is a file; "
        "name a folder to save the model in.\n"
    )
    # Root writes into any folder whatever its mode, so the folder's lack of write permission is what os.access says.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw))
    for output_dir in (locked, locked / "model"):
        assert cli_main(["quickstart", "--output-dir", str(output_dir)]) == 2
        assert capsys.readouterr().err == (
            f"clipcap quickstart: error: --output-dir: {output_dir} cannot be written: the folder {locked} is not "
            "writable; name another folder.\n"
        )


def test_overwrite_removes_the_earlier_runs_records_before_saving_the_new_model(tmp_path, monkeypatch):
    import clipcap_hf.training.quickstart as quickstart

    out = tmp_path / "quickstart"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "clipcap"}))  # an earlier run's model, in short
    (out / "quickstart_config.json").write_text(json.dumps({"seed": 1}))
    (out / "held_out_scores.json").write_text("{}")
    (out / "notes.txt").write_text("mine")

    def killed(path, text):
        raise KeyboardInterrupt  # the run is stopped once the new model is saved, before its records are written

    monkeypatch.setattr(quickstart, "write_text_atomically", killed)
    with pytest.raises(KeyboardInterrupt):
        run_quickstart(out, TINY_RUN, verbose=False, overwrite=True)
    # The new weights are never paired with the earlier run's settings and scores; other files stay.
    assert not (out / "quickstart_config.json").exists() and not (out / "held_out_scores.json").exists()
    assert (out / "model.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"
    assert ClipCapForConditionalGeneration.from_pretrained(out).config.prefix_length == TINY_RUN.prefix_length


def test_overwrite_replaces_an_earlier_model_and_the_trainer_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "quickstart"
    out.mkdir()  # an empty folder is as good as a new one
    run_quickstart(out, dataclasses.replace(TINY_RUN, seed=1), verbose=False)
    assert "'loss'" not in capsys.readouterr().out  # quiet: the Trainer prints no log dicts either
    with pytest.raises(ValueError, match="is not empty; choose another folder"):
        run_quickstart(out, TINY_RUN, verbose=False)
    assert json.loads((out / "quickstart_config.json").read_text())["seed"] == 1
    run_quickstart(out, TINY_RUN, verbose=False, overwrite=True)
    assert json.loads((out / "quickstart_config.json").read_text())["seed"] == 0
    assert ClipCapForConditionalGeneration.from_pretrained(out).config.model_type == "clipcap"
    # Files only: no Trainer output (checkpoints/, runs/) in the model's folder.
    assert [path.name for path in out.iterdir() if not path.is_file()] == []


def test_quickstart_learns_held_out_combinations_and_saves_a_loadable_model(tmp_path, capsys):
    out = tmp_path / "quickstart"
    assert cli_main(["quickstart", "--output-dir", str(out), "--max-steps", "800"]) == 0
    printed = capsys.readouterr().out
    scores = json.loads((out / "held_out_scores.json").read_text())
    unseen, seen = scores["unseen_combinations"], scores["seen_combinations"]
    printed_row = next(line.split() for line in printed.splitlines() if line.strip().startswith("exact_match"))
    assert printed_row == ["exact_match", f"{unseen['exact_match']:.3f}", f"{seen['exact_match']:.3f}"]
    assert (unseen["num_images"], seen["num_images"]) == (96, 96)
    # 800 steps (the default run takes 2000) already compose attributes into combinations never seen in training.
    # Chance is 1/6 for the colour, 1/4 for the shape, 1/5 for the position and 1/120 for the whole caption.
    assert unseen["colour_accuracy"] >= 0.9
    assert unseen["shape_accuracy"] >= 0.4 and unseen["position_accuracy"] >= 0.6
    assert unseen["exact_match"] >= 0.25

    model = ClipCapForConditionalGeneration.from_pretrained(out).eval()
    processor = ClipCapProcessor.from_pretrained(out)
    image = render_shape("green", "ring", "bottom right", np.random.default_rng(1))
    with torch.no_grad():
        expected = processor.batch_decode(model.generate(**processor(images=[image])), skip_special_tokens=True)[0]
    captioner = pipeline("image-captioning", model=str(out))
    assert captioner(image)[0]["generated_text"].strip() == expected.strip()

    image.save(tmp_path / "shape.png")
    assert cli_main(["caption", str(tmp_path / "shape.png"), "--model", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith(expected.strip())


def test_every_saved_file_gets_the_umask_mode(tmp_path):
    previous = os.umask(0o022)  # safetensors alone would write the weights 0600
    try:
        run_quickstart(tmp_path / "quickstart", TINY_RUN, verbose=False)
    finally:
        os.umask(previous)
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in (tmp_path / "quickstart").iterdir()}
    assert modes["model.safetensors"] == "0o644"
    assert set(modes.values()) == {"0o644"}


@pytest.mark.parametrize("seed", ["-1", "4294967296", "1.5"])
def test_a_seed_out_of_range_is_rejected_before_training(tmp_path, capsys, monkeypatch, seed):
    monkeypatch.setattr("clipcap_hf.commands.quickstart.run_quickstart", lambda *args, **kwargs: pytest.fail("ran"))
    assert cli_main(["quickstart", "--output-dir", str(tmp_path), "--seed", seed]) == 2
    message = ("must be a whole number, got '1.5'" if seed == "1.5"
               else f"must be between 0 and 4294967295 (2**32 - 1), got {seed}")
    assert capsys.readouterr().err.endswith(f"clipcap quickstart: error: argument --seed: {message}\n")


def test_the_largest_seed_is_passed_on(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("clipcap_hf.commands.quickstart.run_quickstart",
                        lambda output_dir, config, overwrite: seen.append(config.seed))
    assert cli_main(["quickstart", "--output-dir", str(tmp_path), "--seed", "4294967295"]) == 0
    assert seen == [2**32 - 1]


def test_report_says_how_to_get_bleu_without_pycocoevalcap(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pycocoevalcap", None)  # as after a plain `pip install -e .`
    scores = score_captions(["a red ring in the top left"], ["a red ring in the top left"])
    assert "bleu_4" not in scores
    split = {**scores, "num_images": 1}
    print_report({"train_seconds": 1.0, "unseen_combinations": split, "seen_combinations": split, "samples": []}, "qs")
    assert '  bleu_4             needs pycocoevalcap: pip install "clipcap_hf[eval]"\n' in capsys.readouterr().out
