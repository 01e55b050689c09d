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
    TIMED_CALLS,
    cpu_linear_choices,
    cpu_linear_kernels,
    cpu_linear_mode,
    onednn_linear_available,
)

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="needs PyTorch with oneDNN on x86-64")

ONEDNN_OP = "mkldnn::_linear_pointwise"


@pytest.fixture(autouse=True)
def fresh_measurements(monkeypatch):
    """Every test starts with no kernel measured in the process and no override; its races never outlive it."""
    monkeypatch.delenv(CPU_LINEAR_ENV, raising=False)
    onednn._KERNEL_RACES.clear()
    yield
    onednn._KERNEL_RACES.clear()


@pytest.fixture
def routings(monkeypatch):
    """`(model, measure)` for each block that routed a model's layers (`onednn_linear` or `cpu_linear_kernels`)."""
    entered = []
    route = onednn._routed

    def recording(model, prepack, measure):
        entered.append((model, measure))
        return route(model, prepack=prepack, measure=measure)

    monkeypatch.setattr(onednn, "_routed", recording)
    return entered


def decided(race_times: dict[bool, list[float]]) -> onednn._KernelRace:
    """A race fed these seconds per kernel (`True`: oneDNN), in the order the race asks for the kernels, until it
    chooses."""
    race = onednn._KernelRace()
    remaining = {kernel: list(times) for kernel, times in race_times.items()}
    while race.onednn is None:
        kernel = race.next_is_onednn()
        race.record(kernel, remaining[kernel].pop(0))
    return race


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


@pytest.mark.parametrize("fused", [True, False])
def test_an_optimizer_step_within_a_prepacking_block_packs_the_weights_again(fused):
    # Fused steps (the Trainer's default AdamW) change weights in place without counting a version.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), Conv1D(8, 24))
    inputs = torch.randn(5, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    with onednn_linear(model, prepack=True):
        with torch.no_grad():
            model(inputs)  # packs both weights
        model(inputs).square().sum().backward()  # with gradients: the usual kernels
        optimizer.step()
        with torch.no_grad():
            result, ops = ops_run(lambda: model(inputs))
            hidden = F.linear(inputs, model[0].weight, model[0].bias)  # the usual kernels: called directly
            expected = torch.addmm(model[1].bias, hidden, model[1].weight)
    assert ops.count(PACK_OP) == 2
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_one_optimizer_hook_serves_every_block_and_each_block_is_cleared_until_it_ends():
    from torch.optim.optimizer import _global_optimizer_post_hooks

    torch.manual_seed(0)
    first, second = nn.Linear(16, 8), nn.Linear(16, 8)
    inputs = torch.randn(3, 16)
    optimizer = torch.optim.AdamW(first.parameters(), lr=0.1, fused=True)
    with onednn_linear(first, prepack=True):  # the hook is registered once, by the process's first block
        pass
    hooks = len(_global_optimizer_post_hooks)
    with onednn_linear(first, prepack=True):
        with onednn_linear(second, prepack=True):  # both blocks' packs still empty: equal dicts, told apart
            assert len(_global_optimizer_post_hooks) == hooks  # none per block: steps in other threads iterate them
        with torch.no_grad():
            first(inputs)
        first(inputs).sum().backward()
        optimizer.step()
        with torch.no_grad():
            result, ops = ops_run(lambda: first(inputs))
            expected = F.linear(inputs, first.weight, first.bias)
    assert len(_global_optimizer_post_hooks) == hooks
    assert PACK_OP in ops
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_a_model_built_in_inference_mode_computes_from_its_current_plain_weights():
    # Inference tensors keep no version counter: a packed copy could not tell that `copy_` changed them.
    with torch.inference_mode():
        layer = nn.Linear(16, 8)
        inputs = torch.randn(3, 16)
        with onednn_linear(layer, prepack=True):
            layer(inputs)
            layer.weight.copy_(torch.randn(8, 16))  # as load_state_dict does
            result, ops = ops_run(lambda: layer(inputs))
        expected = F.linear(inputs, layer.weight, layer.bias)
    assert ONEDNN_OP in ops and PACK_OP not in ops
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_keyword_calls_and_forward_mode_ad_compute_as_the_layer_class_does():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    inputs, tangent = torch.randn(3, 16), torch.randn(3, 16)
    with torch.no_grad():
        expected = layer(inputs)
        expected_tangent = torch.func.jvp(layer, (inputs,), (tangent,))[1]
        with onednn_linear(layer):
            torch.testing.assert_close(layer(input=inputs), expected)  # nn.Linear.forward's own keyword
            torch.testing.assert_close(torch.func.jvp(layer, (inputs,), (tangent,))[1], expected_tangent)
            with torch.autograd.forward_ad.dual_level():
                dual = torch.autograd.forward_ad.make_dual(inputs, tangent)
                result = torch.autograd.forward_ad.unpack_dual(layer(dual)).tangent
    torch.testing.assert_close(result, expected_tangent)


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
    model = tiny_model(tokenizer)
    image_embeds = torch.randn(2, model.config.prefix_dim, generator=torch.Generator().manual_seed(0))
    model.generate(image_embeds=image_embeds, max_new_tokens=2)
    assert routings == [(model, True)]  # each kind of call on the kernel measured faster
    monkeypatch.setenv(CPU_LINEAR_ENV, "onednn")
    model.generate(image_embeds=image_embeds, max_new_tokens=2)
    assert routings == [(model, True), (model, False)]
    model.to(torch.bfloat16).generate(image_embeds=image_embeds.bfloat16(), max_new_tokens=2)
    assert len(routings) == 2  # other devices: test_cpu_linear_kernels_change_nothing_for_bf16_or_non_cpu_models


def test_generate_measures_each_kind_of_call_and_keeps_the_captions(tokenizer):
    model = tiny_model(tokenizer)
    vocab_size, hidden = model.get_input_embeddings().weight.shape
    image_embeds = torch.randn(3, model.config.prefix_dim, generator=torch.Generator().manual_seed(0))
    for num_beams in (1, 3):
        with mkldnn_disabled():
            expected = model.generate(image_embeds=image_embeds, num_beams=num_beams, max_new_tokens=8)
        for _ in range(3):  # measuring, then on the kernels chosen
            assert torch.equal(model.generate(image_embeds=image_embeds, num_beams=num_beams, max_new_tokens=8),
                               expected)
    kinds = {(choice["in_features"], choice["out_features"], choice["weight"], choice["rows_up_to"])
             for choice in cpu_linear_choices() if choice["kernel"] is not None}
    # The LM head (row-major) on a greedy step's 3 rows, GPT-2's attention input (`Conv1D`, transposed) on a greedy
    # step's 3 rows and on a 3-beam step's 9: decided apart.
    assert {(hidden, vocab_size, "row-major", 4), (hidden, 3 * hidden, "transposed", 4),
            (hidden, 3 * hidden, "transposed", 16)} <= kinds
    assert all("forward" not in vars(module) for module in model.modules())


def test_gpt2_mlps_apply_their_gelu_in_the_first_layers_product(tokenizer):
    model = tiny_model(tokenizer)
    mlp = model.language_model.transformer.h[0].mlp
    inputs = torch.randn(4, 1, mlp.c_fc.weight.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = mlp(inputs)
        with onednn_linear(model):
            result, ops = ops_run(lambda: mlp(inputs))
    # oneDNN's post-op: no GELU pass of its own, and the two products on oneDNN.
    assert "aten::gelu" not in ops and ops.count(ONEDNN_OP) == 2
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
    assert all("forward" not in vars(module) for module in model.modules())


def test_gpt2_mlps_on_mkl_apply_their_gelu_after_the_product(tokenizer):
    model = tiny_model(tokenizer)
    mlp = model.language_model.transformer.h[0].mlp
    inputs = torch.randn(4, 1, mlp.c_fc.weight.shape[0], generator=torch.Generator().manual_seed(0))
    kind = onednn._call_kind(inputs, mlp.c_fc.weight.T, mlp.c_fc.bias, packed=False, gelu=True)
    onednn._KERNEL_RACES[kind] = decided({False: [1.0] * (1 + TIMED_CALLS), True: [1.0] + [3.0] * TIMED_CALLS})
    with torch.no_grad():
        expected = mlp(inputs)
        with cpu_linear_kernels(model):
            result, ops = ops_run(lambda: mlp(inputs))
    assert "aten::gelu" in ops
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
    assert onednn._KERNEL_RACES[kind].onednn is False and len(onednn._KERNEL_RACES) > 1  # c_proj: its own kind


def test_generate_measures_gpt2s_first_mlp_layers_with_their_gelu(tokenizer):
    model = tiny_model(tokenizer)
    hidden = model.get_input_embeddings().weight.shape[1]
    model.generate(image_embeds=torch.randn(3, model.config.prefix_dim), max_new_tokens=4)
    activations = {
        (choice["in_features"], choice["out_features"]): choice["activation"] for choice in cpu_linear_choices()
    }
    assert activations[(hidden, 4 * hidden)] == "gelu_tanh" and activations[(4 * hidden, hidden)] is None


def test_gpt2_mlps_compute_as_their_class_where_fusing_would_skip_something(tokenizer):
    model = tiny_model(tokenizer)
    mlp = model.language_model.transformer.h[0].mlp
    inputs = torch.randn(4, 1, mlp.c_fc.weight.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pre_activations = mlp.c_fc(inputs)
        expected = mlp(inputs)
    seen = []
    for module in (mlp.c_fc, mlp.act):  # a hook sees the outputs and inputs it would see outside the block
        hook = module.register_forward_hook(lambda module, args, output: seen.append(args[0] if module is mlp.act
                                                                                    else output))
        with torch.no_grad(), onednn_linear(model):
            result, ops = ops_run(lambda: mlp(inputs))
        hook.remove()
        assert "aten::gelu" in ops
        torch.testing.assert_close(seen.pop(), pre_activations, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
    # Another activation, or GELUTanh's Python formula, is computed as the MLP says, not as tanh-GELU.
    for activation in (nn.ReLU(), type(mlp.act)(use_gelu_tanh_python=True)):
        mlp.act = activation
        with torch.no_grad():
            expected = mlp(inputs)
            with onednn_linear(model):
                torch.testing.assert_close(mlp(inputs), expected, rtol=1e-5, atol=1e-5)
    # With gradients (training inside a block), as the class computes it, gradients included.
    with onednn_linear(model):
        mlp(inputs).sum().backward()
    assert mlp.c_fc.weight.grad is not None


def test_a_race_keeps_the_clearly_faster_kernel_after_its_timed_calls():
    race, order = onednn._KernelRace(), []
    for _ in range(2 * (1 + TIMED_CALLS)):
        assert race.onednn is None  # measuring: the kernels alternate, MKL first
        order.append(race.next_is_onednn())
        race.record(order[-1], 1.0 if order[-1] else 2.0)
    assert order == [False, True] * (1 + TIMED_CALLS)
    assert race.onednn is True  # clearly faster on every count
    # As fast: MKL, PyTorch's own, as soon as each kernel has one timed call; oneDNN is not run again.
    race, order = onednn._KernelRace(), []
    while race.onednn is None:
        order.append(race.next_is_onednn())
        race.record(order[-1], 1.0)
    assert order == [False, True, False, True] and race.onednn is False
    race.record(True, 0.001)  # a call recorded after the choice changes nothing
    assert race.onednn is False and len(race.seconds[1]) == 2
    first_call_s = 50.0  # oneDNN builds its primitive on a first call: never counted
    cases = {(2.0, 1.0): True, (1.3, 1.0): True, (1.2, 1.0): False, (1.05, 1.0): False, (1.0, 2.0): False}
    for (mkl_s, onednn_s), onednn_kept in cases.items():
        race = decided({False: [first_call_s] + [mkl_s] * TIMED_CALLS,
                        True: [first_call_s] + [onednn_s] * TIMED_CALLS})
        assert race.onednn is onednn_kept, (mkl_s, onednn_s)
    # The fewest seconds of each count: a busy spell only adds time.
    race = decided({False: [0.1] + [9.0] * (TIMED_CALLS - 1) + [2.0], True: [0.1, 1.0] + [9.0] * (TIMED_CALLS - 1)})
    assert race.onednn is True
    # Faster, but not by the margin on a first timed call slowed by a busy spell: decided on all of them.
    race = decided({False: [0.1] + [2.0] * TIMED_CALLS, True: [0.1, 1.9] + [1.0] * (TIMED_CALLS - 1)})
    assert race.onednn is True


def test_a_measured_block_routes_each_kind_of_call_by_its_own_race(tokenizer):
    model = tiny_model(tokenizer)
    head = model.language_model.lm_head
    step, beams = torch.randn(4, head.in_features), torch.randn(20, head.in_features)
    with torch.no_grad(), cpu_linear_kernels(model):
        measuring = [ONEDNN_OP in ops_run(lambda: head(step))[1]]
        step_race = onednn._KERNEL_RACES[onednn._call_kind(step, head.weight, None, packed=False)]
        while step_race.onednn is None:
            measuring.append(ONEDNN_OP in ops_run(lambda: head(step))[1])
        # Alternating from MKL; oneDNN kept only after all its timed calls, MKL from the first timed call of each.
        assert measuring == [False, True] * (len(measuring) // 2) + [False] * (len(measuring) % 2)
        assert 4 <= len(measuring) <= 2 * (1 + TIMED_CALLS)
        assert all((ONEDNN_OP in ops_run(lambda: head(step))[1]) is step_race.onednn for _ in range(3))
        assert ONEDNN_OP not in ops_run(lambda: head(beams))[1]  # 20 rows: another kind, measured from its start
    for onednn_faster in (True, False):
        onednn_s = 1.0 if onednn_faster else 3.0
        race = decided({False: [1.0] + [2.0] * TIMED_CALLS, True: [1.0] + [onednn_s] * TIMED_CALLS})
        onednn._KERNEL_RACES[onednn._call_kind(beams, head.weight, None, packed=False)] = race
        with torch.no_grad(), cpu_linear_kernels(model):
            assert (ONEDNN_OP in ops_run(lambda: head(beams))[1]) is onednn_faster
    assert cpu_linear_choices() == [
        {
            "in_features": head.in_features, "out_features": head.out_features, "weight": "row-major", "bias": False,
            "packed": False, "activation": None, "rows_up_to": rows_up_to, "threads": torch.get_num_threads(),
            "kernel": "onednn" if race.onednn else "default",
            "mkl_ms": round(min(race.seconds[0][1:]) * 1e3, 3), "onednn_ms": round(min(race.seconds[1][1:]) * 1e3, 3),
        }
        for race, rows_up_to in ((step_race, 4), (race, 32))
    ]


def test_kinds_of_call_differ_by_rows_layout_packing_and_threads():
    inputs, weight = torch.randn(16, 8), torch.randn(24, 8)
    kind = onednn._call_kind(inputs, weight, None, packed=False)
    assert kind == onednn._call_kind(torch.randn(9, 8), weight, None, packed=False)  # 9 to 16 rows: one kind
    others = [
        onednn._call_kind(torch.randn(17, 8), weight, None, packed=False),
        onednn._call_kind(torch.randn(8, 8), weight, None, packed=False),
        onednn._call_kind(inputs, torch.randn(8, 24).T, None, packed=False),  # transposed (GPT-2's Conv1D)
        onednn._call_kind(inputs, weight, torch.randn(24), packed=False),
        onednn._call_kind(inputs, weight, None, packed=True),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        others.append(onednn._call_kind(inputs, weight, None, packed=False))
    finally:
        torch.set_num_threads(threads)
    assert len({kind, *others}) == 1 + len(others)


def test_a_prepacking_race_times_onednn_on_packed_weights_and_never_the_packing(tokenizer, monkeypatch):
    model = tiny_model(tokenizer)
    first, second = (block.mlp.c_fc for block in model.language_model.transformer.h[:2])  # Conv1Ds of one kind
    # A clock that only the work moves: a oneDNN product takes 1 s, an MKL one 2 s, packing a weight 100 s.
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(onednn, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    pack, linear, mkl_forward = onednn._packed_weight, onednn._onednn_linear, Conv1D.forward
    products_on = []  # each oneDNN product's weight: packed or plain

    def slow_packing(layer, weight, packs, state):
        if layer not in packs:
            clock.now += 100.0
        return pack(layer, weight, packs, state)

    def onednn_product(inputs, weight, bias, packed=None, gelu=False):
        clock.now += 1.0
        products_on.append("plain" if packed is None else "packed")
        return linear(inputs, weight, bias, packed, gelu)

    def mkl_product(layer, inputs):
        clock.now += 2.0
        return mkl_forward(layer, inputs)

    monkeypatch.setattr(onednn, "_packed_weight", slow_packing)
    monkeypatch.setattr(onednn, "_onednn_linear", onednn_product)
    monkeypatch.setattr(Conv1D, "forward", mkl_product)
    inputs = torch.randn(4, first.weight.shape[0])
    with torch.no_grad(), cpu_linear_kernels(model, prepack=True):
        outputs = [layer(inputs) for _ in range(2 + TIMED_CALLS) for layer in (first, second)]
    (race,) = onednn._KERNEL_RACES.values()
    # MKL's turn on the first layer; then oneDNN's turns on each layer not packed yet compute from its plain weight
    # and pack it, uncounted; from there the kernels alternate, oneDNN on packed weights. No time counts a packing's
    # 100 s (nor the product that follows it: see below), and oneDNN, twice as fast, is kept.
    assert race.seconds == ([2.0] * (1 + TIMED_CALLS), [1.0] * (1 + TIMED_CALLS)) and race.onednn is True
    # The kind's first packing turn also computes once from the new pack, untimed: oneDNN builds its kernel for the
    # packed layout on its first product there.
    assert products_on == ["plain", "packed", "plain"] + ["packed"] * (1 + TIMED_CALLS)
    with torch.no_grad():
        torch.testing.assert_close(outputs[-1], mkl_forward(second, inputs))


def test_a_weight_replaced_during_a_oneDNN_turn_is_packed_again_not_taken_for_the_old(monkeypatch):
    torch.manual_seed(0)
    layer, inputs = nn.Linear(64, 32), torch.randn(16, 64)
    replacement = nn.Parameter(torch.randn(32, 64))
    linear, mkl_forward = onednn._onednn_linear, nn.Linear.forward
    clock = SimpleNamespace(now=0.0)  # oneDNN's products take 1 s, MKL's 2 s: the race ends on oneDNN

    def product_while_another_thread_replaces_the_weight(inputs, weight, bias, packed=None, gelu=False):
        outputs = linear(inputs, weight, bias, packed, gelu)
        layer.weight = replacement
        clock.now += 1.0
        return outputs

    def mkl_product(module, inputs):
        clock.now += 2.0
        return mkl_forward(module, inputs)

    monkeypatch.setattr(onednn, "_onednn_linear", product_while_another_thread_replaces_the_weight)
    monkeypatch.setattr(nn.Linear, "forward", mkl_product)
    monkeypatch.setattr(onednn, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    with torch.no_grad(), onednn._routed(layer, prepack=True, measure=True):  # as `cpu_linear_kernels` routes a model
        outputs = [layer(inputs) for _ in range(2 * (1 + TIMED_CALLS) + 3)]
        (race,) = onednn._KERNEL_RACES.values()
        assert race.onednn
        # The first oneDNN turn packed the weight it computed with, recorded as that weight, not the replacement.
        torch.testing.assert_close(outputs[-1], nn.functional.linear(inputs, replacement, layer.bias))


def test_one_generate_per_prepacking_block_still_settles_every_kind(tokenizer, monkeypatch):
    # Each block packs anew, as a Trainer evaluation of one batch does: the races still end, within ten calls for the
    # kinds called once per generate() (the mapper's), where oneDNN wins too. A clock that only the products move:
    # oneDNN's take 1 s, MKL's 2 s.
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(onednn, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    linear = onednn._onednn_linear

    def onednn_product(*args, **kwargs):
        clock.now += 1.0
        return linear(*args, **kwargs)

    monkeypatch.setattr(onednn, "_onednn_linear", onednn_product)
    for layer_class in (nn.Linear, Conv1D):

        def mkl_product(layer, inputs, forward=layer_class.forward):
            clock.now += 2.0
            return forward(layer, inputs)

        monkeypatch.setattr(layer_class, "forward", mkl_product)
    model = tiny_model(tokenizer)
    image_embeds = torch.randn(2, model.config.prefix_dim, generator=torch.Generator().manual_seed(0))
    for calls in range(1, 11):
        with torch.no_grad(), cpu_linear_kernels(model, prepack=True):
            model.generate(image_embeds=image_embeds, max_new_tokens=3)
        if all(choice["kernel"] is not None for choice in cpu_linear_choices()):
            break
    choices = cpu_linear_choices()
    assert choices and all(choice["kernel"] == "onednn" for choice in choices), (calls, choices)


def test_a_layer_without_outputs_computes_as_usual(tokenizer):
    model = tiny_model(tokenizer)
    model.extra = nn.Linear(8, 0)  # oneDNN builds no kernel for it
    inputs = torch.randn(3, 8)
    for prepack in (False, True):
        with torch.no_grad(), cpu_linear_kernels(model, prepack=prepack):
            outputs, ops = ops_run(lambda: [model.extra(inputs) for _ in range(2 * (1 + TIMED_CALLS))])
        assert all(output.shape == (3, 0) for output in outputs) and ONEDNN_OP not in ops
    assert onednn._KERNEL_RACES == {}


def test_cpu_linear_choices_lists_kinds_still_measuring():
    race = onednn._KernelRace()
    race.record(False, 5.0)  # an untimed first call
    onednn._KERNEL_RACES[onednn._call_kind(torch.randn(3, 8), torch.randn(24, 8), None, packed=False)] = race
    (choice,) = cpu_linear_choices()
    assert choice["kernel"] is None and choice["mkl_ms"] is None and choice["onednn_ms"] is None
    race.record(False, 0.002)
    assert cpu_linear_choices()[0]["mkl_ms"] == 2.0


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


def test_no_onednn_and_no_measurement_where_it_is_unavailable(tokenizer, monkeypatch):
    model = tiny_model(tokenizer)

    def check():
        layer = model.language_model.lm_head
        for mode in ("auto", "onednn"):  # not even when asked for
            monkeypatch.setenv(CPU_LINEAR_ENV, mode)
            assert cpu_linear_mode(model) == "default"
            with torch.no_grad(), cpu_linear_kernels(model):
                _, ops = ops_run(lambda: [layer(torch.randn(2, layer.in_features)) for _ in range(3)])
            assert ONEDNN_OP not in ops

    with mkldnn_disabled():
        check()
    with monkeypatch.context() as patched:
        patched.setattr(onednn.platform, "machine", lambda: "aarch64")
        check()
    with monkeypatch.context() as patched:
        patched.setattr(torch.ops, "mkldnn", SimpleNamespace())  # a PyTorch without the operator
        check()
    assert onednn._KERNEL_RACES == {}


def test_cpu_linear_kernels_change_nothing_for_bf16_or_non_cpu_models(tokenizer, monkeypatch, routings):
    model = tiny_model(tokenizer)
    for override in ("auto", "onednn"):
        monkeypatch.setenv(CPU_LINEAR_ENV, override)
        model.to(torch.bfloat16)
        assert cpu_linear_mode(model) == "default"
        with cpu_linear_kernels(model):
            pass
        model.float()
        with monkeypatch.context() as patched:
            patched.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
            assert cpu_linear_mode(model) == "default"
            with cpu_linear_kernels(model):
                pass
    assert routings == []
    with cpu_linear_kernels(model):  # the fp32 model on the CPU
        pass
    assert routings == [(model, False)]


def test_the_environment_variable_overrides_the_measurement(tokenizer, monkeypatch, routings):
    model = tiny_model(tokenizer)
    for override, mode in [("onednn", "onednn"), ("default", "default"), (" ONEDNN ", "onednn"), ("auto", "auto"),
                           ("", "auto")]:
        monkeypatch.setenv(CPU_LINEAR_ENV, override)
        assert cpu_linear_mode(model) == mode
        routings.clear()
        with cpu_linear_kernels(model):
            pass
        assert routings == ({"onednn": [(model, False)], "auto": [(model, True)], "default": []}[mode])
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
