import copy
import pickle
import weakref
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import PACK_OP, mkldnn_disabled, tiny_model
from torch import nn
from torch.profiler import profile
from transformers.generation import SuppressTokensLogitsProcessor
from transformers.pytorch_utils import Conv1D

from clipcap_hf import modeling_clipcap, onednn, onednn_linear
from clipcap_hf.onednn import (
    CPU_LINEAR_ENV,
    cpu_linear_choice,
    cpu_linear_kernels,
    linear_kernel_times,
    onednn_is_faster,
    onednn_linear_available,
)

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="needs PyTorch with oneDNN on x86-64")

ONEDNN_OP = "mkldnn::_linear_pointwise"


@pytest.fixture(autouse=True)
def fresh_measurements(monkeypatch):
    """Every test starts with no cached kernel times and no override; fake times never outlive their test."""
    monkeypatch.delenv(CPU_LINEAR_ENV, raising=False)
    onednn._cached_linear_kernel_times.cache_clear()
    yield
    onednn._cached_linear_kernel_times.cache_clear()


@pytest.fixture
def measured(monkeypatch):
    """
    The shapes timed, in order, with the timing replaced by the times in `measured.times` (`(in, out)` -> `(mkl_s,
    onednn_s)`; real timing for shapes not there).
    """

    class Spy(list):
        times = {}

    spy = Spy()
    time_linear_kernels = onednn._time_linear_kernels

    def spying(in_features, out_features, rows):
        spy.append((in_features, out_features, rows))
        if (in_features, out_features) in spy.times:
            return spy.times[in_features, out_features]
        return time_linear_kernels(in_features, out_features, rows)

    monkeypatch.setattr(onednn, "_time_linear_kernels", spying)
    return spy


@pytest.fixture
def routings(monkeypatch):
    """The models `onednn_linear` was entered for, however it was reached."""
    entered = []
    route = onednn.onednn_linear

    def recording(model, prepack=False):
        entered.append(model)
        return route(model, prepack=prepack)

    monkeypatch.setattr(onednn, "onednn_linear", recording)
    return entered


def ops_run(function):
    """The result of `function()` and the names of the operators it ran."""
    with profile() as profiler:
        result = function()
    return result, [event.name for event in profiler.events()]


def test_linear_and_conv1d_layers_run_through_onednn_with_the_same_results():
    torch.manual_seed(0)
    layers = [nn.Linear(24, 40), nn.Linear(24, 40, bias=False), Conv1D(40, 24)]
    inputs = torch.randn(3, 5, 24)  # the kernel takes rows: leading dimensions are flattened and restored
    for layer in layers:
        with torch.no_grad():
            expected = layer(inputs)
            with onednn_linear(layer):
                result, ops = ops_run(lambda: layer(inputs))
        assert ONEDNN_OP in ops, layer
        assert result.shape == expected.shape == (3, 5, 40)
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
        assert "forward" not in vars(layer)  # the block leaves the layer as it found it


def test_transposed_weights_and_strided_or_one_dimensional_inputs():
    torch.manual_seed(0)
    layer = nn.Linear(24, 40)
    layer.weight = nn.Parameter(torch.randn(24, 40).T)  # column-major
    strided_inputs = torch.randn(24, 14).T[::2]  # 7 rows of 24, neither row- nor column-major
    for inputs in (torch.randn(7, 24), torch.randn(24), strided_inputs):
        with torch.no_grad():
            expected = layer(inputs)
            with onednn_linear(layer):
                result, ops = ops_run(lambda: layer(inputs))
        assert ONEDNN_OP in ops
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
    # A weight that is neither row- nor column-major goes the usual way.
    layer.weight = nn.Parameter(torch.randn(40, 48)[:, ::2])
    inputs = torch.randn(3, 24)
    with torch.no_grad(), onednn_linear(layer):
        result, ops = ops_run(lambda: layer(inputs))
    assert ONEDNN_OP not in ops
    assert torch.equal(result, F.linear(inputs, layer.weight, layer.bias))


class ScaledLinear(nn.Linear):
    def forward(self, inputs):
        return 2 * super().forward(inputs)


def test_everything_else_runs_as_usual():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    inputs = torch.randn(4, 16)
    # With gradients on: the usual kernel, and gradients flow.
    with onednn_linear(layer):
        outputs, ops = ops_run(lambda: layer(inputs))
    assert ONEDNN_OP not in ops
    outputs.sum().backward()
    assert layer.weight.grad is not None

    def with_plain_weight():
        computed = nn.Linear(16, 8)
        weight = computed.weight.detach()
        del computed.weight
        computed.weight = weight  # a tensor, not a parameter: it would be packed anew at every call
        return computed

    def with_strided_bias():  # oneDNN reads a bias as a flat array
        strided = nn.Linear(16, 8)
        strided.bias = nn.Parameter(torch.randn(16)[::2])
        return strided

    def with_hooked_forward():  # a forward replaced on the instance (accelerate's hooks) is kept
        hooked = nn.Linear(16, 8)
        hooked.forward = lambda inputs: F.linear(inputs, hooked.weight, hooked.bias)
        return hooked

    cases = {
        "float64": lambda: nn.Linear(16, 8).double(),
        "a subclass": lambda: ScaledLinear(16, 8),
        "a weight that is not a parameter": with_plain_weight,
        "a strided bias": with_strided_bias,
        "a hooked forward": with_hooked_forward,
    }
    for name, build in cases.items():
        module = build()
        module_inputs = inputs.to(module.weight.dtype)
        with torch.no_grad():
            expected = module(module_inputs)
            with onednn_linear(module):
                result, ops = ops_run(lambda: module(module_inputs))
        assert ONEDNN_OP not in ops, name
        assert torch.equal(result, expected), name


def test_autocast_keeps_its_lower_precision():
    layer = nn.Linear(16, 8)
    inputs = torch.randn(2, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer(inputs)
        with onednn_linear(layer):
            result, ops = ops_run(lambda: layer(inputs))
    assert ONEDNN_OP not in ops
    assert result.dtype == torch.bfloat16
    assert torch.equal(result, expected)


def test_mkldnn_flag_turns_it_off():
    layer = nn.Linear(16, 8)
    with torch.no_grad(), mkldnn_disabled():
        assert not onednn_linear_available()
        with onednn_linear(layer):
            _, ops = ops_run(lambda: layer(torch.randn(2, 16)))
    assert ONEDNN_OP not in ops


def test_generate_runs_on_plain_weights():
    layer = nn.Linear(16, 8)
    with torch.no_grad(), onednn_linear(layer):
        _, ops = ops_run(lambda: layer(torch.randn(2, 16)))
    assert ONEDNN_OP in ops and PACK_OP not in ops


def test_prepacked_weights_are_packed_once_per_block_and_again_after_they_change():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), Conv1D(8, 24))
    inputs = torch.randn(5, 16)
    with torch.no_grad(), onednn_linear(model, prepack=True):
        _, first = ops_run(lambda: model(inputs))
        _, second = ops_run(lambda: model(inputs))
        assert first.count(PACK_OP) == 2 and ONEDNN_OP in first  # one packed copy per layer
        assert PACK_OP not in second and second.count(ONEDNN_OP) == 2  # kept within the block
        model[1].weight.mul_(-1)  # in place, as an optimizer step does
        model[0].weight = nn.Parameter(torch.randn(24, 16))  # another parameter
        hidden = F.linear(inputs, model[0].weight, model[0].bias)  # the usual kernels: called directly
        expected = torch.addmm(model[1].bias, hidden, model[1].weight)
        result, changed = ops_run(lambda: model(inputs))
    assert changed.count(PACK_OP) == 2
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        model[0].weight.data.mul_(2)  # through .data between blocks, as peft's merge_adapter does
        expected = model(inputs)
        with onednn_linear(model, prepack=True):
            result, ops = ops_run(lambda: model(inputs))
    assert ops.count(PACK_OP) == 2  # each block packs afresh: nothing stale outlives it
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_a_weight_shared_by_a_linear_and_a_conv1d_layer_is_packed_for_each():
    linear = nn.Linear(16, 16, bias=False)
    conv = Conv1D(16, 16)
    conv.weight = linear.weight  # read transposed by Conv1D
    model = nn.Sequential(linear, conv)
    inputs = torch.randn(3, 16)
    with torch.no_grad():
        expected = (linear(inputs), conv(inputs))
        with onednn_linear(model, prepack=True):
            result = (linear(inputs), conv(inputs))
    for got, want in zip(result, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_model_built_in_inference_mode():
    with torch.inference_mode():
        layer = nn.Linear(16, 8)  # its parameters are inference tensors, with no version counter
        inputs = torch.randn(3, 16)
        with onednn_linear(layer, prepack=True):
            result, ops = ops_run(lambda: layer(inputs))
        expected = F.linear(inputs, layer.weight, layer.bias)
    assert ONEDNN_OP in ops
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_a_forward_replaced_within_the_block_is_kept_at_its_end():
    layer = nn.Linear(16, 8)

    def hooked(inputs):  # as accelerate's add_hook_to_module would put there
        return F.linear(inputs, layer.weight, layer.bias)

    with onednn_linear(layer):
        layer.forward = hooked
    assert vars(layer)["forward"] is hooked


def test_a_copy_or_pickle_made_within_the_block_computes_as_usual_and_can_be_routed_again():
    model = nn.Sequential(nn.Linear(16, 8), Conv1D(16, 8))
    inputs = torch.randn(2, 16)
    with torch.no_grad():
        expected = model(inputs)
        with onednn_linear(model, prepack=True):
            model(inputs)  # packs both weights: packed copies cannot be deep-copied or pickled
            clones = {"deepcopy": copy.deepcopy(model), "pickle": pickle.loads(pickle.dumps(model))}
    for how, clone in clones.items():
        with torch.no_grad():
            result, ops = ops_run(lambda: clone(inputs))
            assert ONEDNN_OP not in ops, how
            torch.testing.assert_close(result, expected)
            with onednn_linear(clone):
                routed, ops = ops_run(lambda: clone(inputs))
        assert ops.count(ONEDNN_OP) == 2, how
        torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-5)
        assert all("forward" not in vars(layer) for layer in clone), how  # the later block left it clean
    # Nothing in a copy refers back to it: reference counting frees it, without waiting for the cycle collector.
    with torch.no_grad(), onednn_linear(model):
        copied = copy.deepcopy(model)
    alive = weakref.ref(copied[0])
    del copied
    assert alive() is None


def test_a_forward_that_outlives_its_block_computes_as_usual_from_the_current_weights():
    layer = Conv1D(8, 16)
    inputs = torch.randn(2, 16)
    with torch.no_grad(), onednn_linear(layer, prepack=True):
        layer(inputs)  # packed
        shallow = copy.copy(layer)  # shares the layer's instance dict entries, the routed forward among them
        kept = layer.forward  # as a hook wrapped around the layer within the block would keep it
    with torch.no_grad():
        layer.weight.data.mul_(2)  # not seen by a packed copy: were one still used, the result would be stale
        expected = layer(inputs)
        for forward in (shallow, kept):
            result, ops = ops_run(lambda: forward(inputs))
            assert ONEDNN_OP not in ops
            torch.testing.assert_close(result, expected)


def test_nested_blocks_route_once_and_restore_at_the_outer_end():
    layer = nn.Linear(16, 8)
    with torch.no_grad(), onednn_linear(layer):
        routed = vars(layer)["forward"]
        with onednn_linear(layer):
            assert vars(layer)["forward"] is routed
        assert vars(layer)["forward"] is routed
        _, ops = ops_run(lambda: layer(torch.randn(2, 16)))
    assert ONEDNN_OP in ops and "forward" not in vars(layer)


def test_generate_decodes_through_onednn_with_the_same_captions(tokenizer, monkeypatch):
    monkeypatch.setenv(CPU_LINEAR_ENV, "onednn")  # whatever this machine measures
    model = tiny_model(tokenizer)
    image_embeds = torch.randn(3, model.config.prefix_dim, generator=torch.Generator().manual_seed(0))
    for num_beams in (1, 3):
        with mkldnn_disabled():
            expected, usual_ops = ops_run(lambda: model.generate(image_embeds=image_embeds, num_beams=num_beams))
        result, ops = ops_run(lambda: model.generate(image_embeds=image_embeds, num_beams=num_beams))
        assert ONEDNN_OP in ops and ONEDNN_OP not in usual_ops
        assert torch.equal(result, expected)
    assert all("forward" not in vars(module) for module in model.modules())


def test_generate_uses_it_for_fp32_models_on_the_cpu_only(tokenizer, monkeypatch, routings):
    monkeypatch.setenv(CPU_LINEAR_ENV, "onednn")
    model = tiny_model(tokenizer)
    image_embeds = torch.randn(2, model.config.prefix_dim, generator=torch.Generator().manual_seed(0))
    model.generate(image_embeds=image_embeds, max_new_tokens=2)
    assert routings == [model]
    model.to(torch.bfloat16).generate(image_embeds=image_embeds.bfloat16(), max_new_tokens=2)
    assert routings == [model]  # other devices: test_cpu_linear_kernels_change_nothing_for_bf16_or_non_cpu_models


def test_generate_follows_the_measured_choice(tokenizer, measured, routings):
    model = tiny_model(tokenizer)
    vocab_size, hidden = model.get_input_embeddings().weight.shape
    image_embeds = torch.randn(2, model.config.prefix_dim, generator=torch.Generator().manual_seed(0))
    measured.times.update({(hidden, 4 * hidden): (1.0, 1.0), (hidden, vocab_size): (1.0, 1.0)})  # no faster
    expected = model.generate(image_embeds=image_embeds, max_new_tokens=3)
    assert routings == []
    onednn._cached_linear_kernel_times.cache_clear()
    measured.times.update({(hidden, 4 * hidden): (2.0, 1.0), (hidden, vocab_size): (2.0, 1.0)})  # twice as fast
    assert torch.equal(model.generate(image_embeds=image_embeds, max_new_tokens=3), expected)
    assert routings == [model]


def test_a_failed_generate_leaves_no_layer_routed(tokenizer, monkeypatch):
    monkeypatch.setenv(CPU_LINEAR_ENV, "onednn")
    model = tiny_model(tokenizer)
    image_embeds = torch.randn(2, model.config.prefix_dim)
    with pytest.raises(ValueError):  # more sequences than beams: refused inside the language model's generate
        model.generate(image_embeds=image_embeds, num_beams=2, num_return_sequences=3)
    assert all("forward" not in vars(module) for module in model.modules())


def test_only_x86_processors_use_it(monkeypatch):
    # Measured on x86-64 only; oneDNN's fp32 kernels on other processors are other code.
    monkeypatch.setattr(onednn.platform, "machine", lambda: "aarch64")
    assert not onednn_linear_available()
    layer = nn.Linear(16, 8)
    with torch.no_grad(), onednn_linear(layer):
        _, ops = ops_run(lambda: layer(torch.randn(2, 16)))
    assert ONEDNN_OP not in ops


def test_each_shape_is_measured_once_per_process(measured):
    first = onednn_is_faster(16, 24, rows=4)
    assert isinstance(first, bool)
    assert onednn_is_faster(16, 24, rows=4) is first
    mkl_s, onednn_s = linear_kernel_times(16, 24, rows=4)
    assert isinstance(mkl_s, float) and isinstance(onednn_s, float)
    assert measured == [(16, 24, 4)]
    onednn_is_faster(16, 24, rows=8)
    onednn_is_faster(24, 16, rows=4)
    onednn_is_faster(16, 24, rows=4)
    assert measured == [(16, 24, 4), (16, 24, 8), (24, 16, 4)]


def test_measuring_leaves_the_global_random_state_alone():
    # Seeded sampling must give the same captions whether or not a measurement ran first in the process.
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    linear_kernel_times(16, 24, rows=4)  # a real measurement: the fixture cleared the cache
    assert torch.equal(torch.get_rng_state(), state)


def test_onednn_only_when_clearly_faster(measured):
    cases = {(2.0, 1.0): True, (1.2, 1.0): True, (1.05, 1.0): False, (1.0, 1.0): False, (1.0, 2.0): False}
    for (mkl_s, onednn_s), faster in cases.items():
        onednn._cached_linear_kernel_times.cache_clear()
        measured.times[16, 24] = (mkl_s, onednn_s)
        assert onednn_is_faster(16, 24) is faster, (mkl_s, onednn_s)


def test_no_onednn_and_no_measurement_where_it_is_unavailable(tokenizer, monkeypatch, measured):
    model = tiny_model(tokenizer)
    monkeypatch.setenv(CPU_LINEAR_ENV, "onednn")  # not even when asked for

    def check():
        assert not onednn_is_faster(16, 24)
        assert linear_kernel_times(16, 24) is None
        assert cpu_linear_choice(model) == "default"
        layer = model.language_model.lm_head
        with torch.no_grad(), cpu_linear_kernels(model):
            _, ops = ops_run(lambda: layer(torch.randn(2, layer.in_features)))
        assert ONEDNN_OP not in ops

    with mkldnn_disabled():
        check()
    with monkeypatch.context() as patched:
        patched.setattr(onednn.platform, "machine", lambda: "aarch64")
        check()
    with monkeypatch.context() as patched:
        patched.setattr(torch.ops, "mkldnn", SimpleNamespace())  # a PyTorch without the operator
        check()
    assert measured == []


def test_cpu_linear_kernels_measures_the_language_models_widths(tokenizer, measured):
    model = tiny_model(tokenizer)
    vocab_size, hidden = model.get_input_embeddings().weight.shape
    layer = model.language_model.lm_head

    def routed():
        with torch.no_grad(), cpu_linear_kernels(model):
            _, ops = ops_run(lambda: layer(torch.randn(2, hidden)))
        return ONEDNN_OP in ops

    cases = {
        # (widening layer, LM head) -> choice: decided by their summed times
        ((2.0, 1.0), (2.0, 1.0)): "onednn",
        ((1.0, 2.0), (1.0, 2.0)): "default",
        ((1.0, 1.0), (1.0, 1.0)): "default",  # not faster by the margin
        ((1.0, 0.1), (10.0, 10.0)): "default",  # a faster MLP layer does not make up for an as-slow head
        ((1.0, 2.0), (10.0, 5.0)): "onednn",
    }
    for (widening, head), choice in cases.items():
        onednn._cached_linear_kernel_times.cache_clear()
        measured.clear()
        measured.times.update({(hidden, 4 * hidden): widening, (hidden, vocab_size): head})
        assert cpu_linear_choice(model) == choice, (widening, head)
        assert routed() is (choice == "onednn"), (widening, head)
        assert measured == [(hidden, 4 * hidden, 16), (hidden, vocab_size, 16)]  # once: the second call reused them


def test_cpu_linear_kernels_change_nothing_for_bf16_or_non_cpu_models(tokenizer, monkeypatch, measured, routings):
    model = tiny_model(tokenizer)
    vocab_size, hidden = model.get_input_embeddings().weight.shape
    measured.times.update({(hidden, 4 * hidden): (2.0, 1.0), (hidden, vocab_size): (2.0, 1.0)})
    for override in ("auto", "onednn"):
        monkeypatch.setenv(CPU_LINEAR_ENV, override)
        model.to(torch.bfloat16)
        assert cpu_linear_choice(model) == "default"
        with cpu_linear_kernels(model):
            pass
        model.float()
        with monkeypatch.context() as patched:
            patched.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
            assert cpu_linear_choice(model) == "default"
            with cpu_linear_kernels(model):
                pass
    assert measured == [] and routings == []
    with cpu_linear_kernels(model):  # the fp32 model on the CPU
        pass
    assert routings == [model]


def test_the_environment_variable_overrides_the_measurement(tokenizer, monkeypatch, measured, routings):
    model = tiny_model(tokenizer)
    vocab_size, hidden = model.get_input_embeddings().weight.shape
    for times, override, choice in [
        ((1.0, 2.0), "onednn", "onednn"),
        ((2.0, 1.0), "default", "default"),
        ((2.0, 1.0), " ONEDNN ", "onednn"),
    ]:
        measured.times.update({(hidden, 4 * hidden): times, (hidden, vocab_size): times})
        monkeypatch.setenv(CPU_LINEAR_ENV, override)
        assert cpu_linear_choice(model) == choice
        routings.clear()
        with cpu_linear_kernels(model):
            pass
        assert routings == ([model] if choice == "onednn" else [])
    assert measured == []  # forced: nothing timed
    for automatic in ("auto", ""):
        monkeypatch.setenv(CPU_LINEAR_ENV, automatic)
        assert cpu_linear_choice(model) == "onednn"  # measured: 2.0 s against 1.0 s
    assert len(measured) == 2
    monkeypatch.setenv(CPU_LINEAR_ENV, "mkl")
    with pytest.raises(ValueError, match=CPU_LINEAR_ENV), cpu_linear_kernels(model):
        pass


def test_a_block_held_over_generate_calls_packs_each_weight_once(tokenizer, monkeypatch):
    monkeypatch.setenv(CPU_LINEAR_ENV, "onednn")
    model = tiny_model(tokenizer)
    image_embeds = torch.randn(3, model.config.prefix_dim, generator=torch.Generator().manual_seed(0))
    expected = model.generate(image_embeds=image_embeds, max_new_tokens=4)
    linear_layers = sum(type(module) in (nn.Linear, Conv1D) for module in model.modules())
    with torch.no_grad(), cpu_linear_kernels(model, prepack=True):
        first, first_ops = ops_run(lambda: model.generate(image_embeds=image_embeds, max_new_tokens=4))
        second, second_ops = ops_run(lambda: model.generate(image_embeds=image_embeds, max_new_tokens=4))
    # Each layer the images and tokens go through (not the vision tower's: the embeddings are given) packed once.
    assert 0 < first_ops.count(PACK_OP) < linear_layers and PACK_OP not in second_ops
    assert ONEDNN_OP in second_ops
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert all("forward" not in vars(module) for module in model.modules())


def test_the_image_token_is_suppressed_by_index_with_the_same_scores(tokenizer):
    model = tiny_model(tokenizer)
    image_token_id = model.config.image_token_id
    vocab_size = model.get_output_embeddings().weight.shape[0]
    processors = model._get_logits_processor(generation_config=model.generation_config, device="cpu")
    [suppressing] = [processor for processor in processors if isinstance(processor, SuppressTokensLogitsProcessor)]
    assert type(suppressing) is modeling_clipcap._SuppressTokensByIndex
    scores = torch.randn(3, vocab_size, generator=torch.Generator().manual_seed(0))
    suppressed = [image_token_id, 0, vocab_size + 5, -1]  # ids outside the vocabulary are ignored, as transformers does
    expected = SuppressTokensLogitsProcessor(suppressed)(None, scores)
    result = modeling_clipcap._SuppressTokensByIndex(suppressed)(None, scores)
    assert torch.equal(result, expected) and result[:, [image_token_id, 0]].isneginf().all()
    assert not scores.isinf().any()  # the scores given are left as they were


def test_a_pytorch_without_the_reorder_computes_from_plain_weights(monkeypatch):
    has_op = onednn._has_mkldnn_op
    monkeypatch.setattr(onednn, "_has_mkldnn_op", lambda name: name != "_reorder_linear_weight" and has_op(name))
    assert onednn_linear_available()
    layer = nn.Linear(16, 8)
    inputs = torch.randn(3, 16)
    with torch.no_grad(), onednn_linear(layer, prepack=True):
        result, ops = ops_run(lambda: layer(inputs))
    assert ONEDNN_OP in ops and PACK_OP not in ops
    torch.testing.assert_close(result, F.linear(inputs, layer.weight, layer.bias).detach(), rtol=1e-5, atol=1e-5)


def test_an_empty_suppress_list_still_suppresses_the_image_token(tokenizer):
    model = tiny_model(tokenizer)
    image_embeds = torch.randn(2, model.config.prefix_dim, generator=torch.Generator().manual_seed(0))
    final_norm = model.language_model.transformer.ln_f  # every hidden state all ones, and the image token's row tens:
    final_norm.weight.data.zero_()
    final_norm.bias.data.fill_(1.0)
    model.get_output_embeddings().weight.data[model.config.image_token_id] = 10.0  # the image token wins unsuppressed
    for extra in ({}, {"suppress_tokens": []}):  # the caller's list replaces the saved one, the image token stays out
        out = model.generate(
            image_embeds=image_embeds, max_new_tokens=2, output_logits=True, return_dict_in_generate=True, **extra
        )
        assert all((logits.argmax(-1) == model.config.image_token_id).all() for logits in out.logits)  # unprocessed
        assert not (out.sequences[:, model.config.prefix_length :] == model.config.image_token_id).any()
    scores = torch.randn(2, 7)
    assert torch.equal(modeling_clipcap._SuppressTokensByIndex([])(None, scores), scores)
