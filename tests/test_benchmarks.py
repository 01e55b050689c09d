"""Smoke runs of the benchmarks that have one (tiny models, CPU), and the fast paths they time give plain tokens."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _common
import bench_data
import bench_gpu
import bench_peers
import bench_train

# Not on the GPU machine the GPU benchmark is written for.
ABSENT_THERE = ("datasets", "evaluate", "open_clip", "gradio", "pycocoevalcap")
PEERS = ("vit_gpt2", "blip_base", "git_base")


def test_bench_peers_small_reports_every_model_and_the_speedup_over_the_fastest_peer(monkeypatch, capsys):
    argv = ["bench_peers.py", "--small", "--images", "2", "--new-tokens", "3", "--beams", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    bench_peers.main()
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for mode in ("greedy", "beam"):
        times = {name: report[f"{name}_{mode}_s"] for name in bench_peers.BUILDERS}
        assert all(seconds > 0 for seconds in times.values())
        assert set(times) == {*bench_peers.CLIPCAP_NAMES, *PEERS}
        fastest = min(PEERS, key=times.get)
        assert report[f"fastest_peer_{mode}"] == fastest
        assert report[f"clipcap_mlp_speedup_{mode}"] == round(times[fastest] / times["clipcap_mlp"], 2)
        run_s = report[f"clipcap_mlp_run_{mode}_s"]
        assert run_s > 0 and report[f"clipcap_mlp_run_speedup_{mode}"] == round(times[fastest] / run_s, 2)


@pytest.mark.parametrize("name", [*bench_peers.CLIPCAP_NAMES, *PEERS])
def test_every_captioner_gives_exactly_the_asked_number_of_tokens(name):
    captioner = bench_peers.BUILDERS[name](small=True)
    pixel_values = captioner.pixels(2)
    prompt_length = captioner.caption(pixel_values, 1).shape[1] - 1  # what each model puts before the caption
    for beams in (1, 2):
        assert captioner.caption(pixel_values, 4, beams).shape == (2, prompt_length + 4)


def test_the_benchmarks_clipcap_tokens_equal_generates():
    captioner = bench_peers.build_clipcap("mlp", small=True)
    pixel_values = captioner.pixels(3)
    expected = captioner.model.generate(pixel_values=pixel_values, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    _, timed = bench_peers.time_captioning(captioner, pixel_values, 6, beams=1)
    assert torch.equal(timed, expected)
    # The GPU benchmark's fast path: a static cache and a compiled decoding step (traced, not compiled, on the CPU).
    smoke = type("Args", (), {"compile_backend": "eager", "smoke": True})
    _, fast = bench_peers.time_captioning(
        captioner, pixel_values, 6, 1, cache_implementation="static", compile_config=bench_gpu.compile_config(smoke)
    )
    assert torch.equal(fast, expected)


def test_bench_gpu_smoke_runs_without_the_packages_the_gpu_machine_lacks(tmp_path):
    script = f"""
        import runpy, sys
        for name in {ABSENT_THERE!r}:
            sys.modules[name] = None  # as if not installed
        sys.argv = ["bench_gpu.py", "--smoke"]
        runpy.run_path({str(BENCHMARKS / "bench_gpu.py")!r}, run_name="__main__")
        """
    python_path = os.pathsep.join([str(BENCHMARKS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": python_path}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], check=False, capture_output=True, text=True, env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["smoke"] and report["dtype"] == "float32"
    for recipe in ("a", "b"):
        largest = report[f"train_{recipe}_largest_batch"]
        assert largest == 8  # the smoke search's cap, doubled from 4
        for batch in (4, largest):
            entry = report[f"train_{recipe}_batch{batch}"]
            assert entry["batch"] == batch and entry["samples_per_s"] > 0 and entry["gflops_per_sample"] > 0
    for mode in ("greedy", "beam"):
        for name in (*bench_peers.CLIPCAP_NAMES, *PEERS):
            assert report[f"{name}_{mode}_captions_per_s"] > 0
        assert report[f"clipcap_mlp_{mode}_static_compiled_captions_per_s"] > 0
        assert report[f"clipcap_mlp_{mode}_static_compiled_tokens_match"] == 1.0
    assert report["embed_cpu_decode_images_per_s"] > 0


def test_bench_data_takes_each_ranks_embedding_seconds_from_its_file_not_from_the_shared_output(tmp_path):
    bench_data.write_model(tmp_path / "model")
    files = ",".join(bench_data.write_source(tmp_path, 4))
    script = tmp_path / "clipcap_timed.py"
    script.write_text(bench_data.CLIPCAP)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    embed = ["embed", "--model", str(tmp_path / "model"), "--train_file", files, "--caption_column", "caption",
             "--batch_size", "2", "--output", str(tmp_path / "embeddings")]  # fmt: skip
    # Then two ranks' lines run together in the output they share, as unbuffered ranks finishing at once write them.
    interleaved = """printf '{"embedding_seconds": 1.0}{"embedding_seconds": 2.0}\\n'"""
    _, records = bench_data.run(["sh", "-c", f'"$@" && {interleaved}', "sh", *torchrun, *embed], tmp_path)
    assert len(records) == 2
    assert 0 < bench_data.embedding_seconds(records, 2) == max(record["embedding_seconds"] for record in records)
    with pytest.raises(RuntimeError, match="2 processes embedded, but 1 recorded"):
        bench_data.embedding_seconds(records[:1], 2)


def test_bench_train_counts_the_same_caption_tokens_for_both_runs_the_image_prefix_left_out(monkeypatch):
    import transformers

    gpt2_config = transformers.GPT2Config  # build_model's GPT-2 small, made tiny
    monkeypatch.setattr(transformers, "GPT2Config", lambda: gpt2_config(n_layer=1, n_embd=32, n_head=2))
    monkeypatch.setattr(bench_train, "BATCH_SIZE", 4)
    for recipe in bench_train.RECIPES.values():
        reference = bench_train.run_reference(recipe, steps=2)["padded_caption_tokens"]
        ours = bench_train.run_ours(recipe, steps=2)["padded_caption_tokens"]
        # Ours pads each batch to its longest caption, the reference to the dataset's longest (10,000 captions, the
        # same length distribution): with the prefix's 10 or 40 image tokens counted, ours would be the longer.
        assert reference == bench_train.caption_lengths(bench_train.DATASET_CAPTIONS).max()
        assert 0 < ours <= reference


def test_use_seven_operation_gelu_new_puts_transformers_gelu_new_back_in_a_clipcap_model():
    from transformers.activations import NewGELUActivation

    model = bench_peers.build_clipcap("mlp", small=True).model
    activations = [block.mlp.act for block in model.language_model.transformer.h]
    assert not any(isinstance(act, NewGELUActivation) for act in activations)  # ClipCap's own activation
    _common.use_seven_operation_gelu_new(model.language_model)
    assert all(type(block.mlp.act) is NewGELUActivation for block in model.language_model.transformer.h)


def test_bench_data_lists_no_descendants_of_a_process_that_has_ended():
    # Its memory poll lists the run's processes while they end: a vanished /proc entry must not stop the benchmark.
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert bench_data.descendants(process.pid) == []
