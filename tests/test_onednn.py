from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from torch import nn
from torch.profiler import profile
from transformers.pytorch_utils import Conv1D

from clipcap_hf import modeling_clipcap, onednn, onednn_linear
from clipcap_hf.onednn import onednn_linear_available

pytestmark = pytest.mark.skipif(not onednn_linear_available(), reason="needs PyTorch with oneDNN on x86-64")

ONEDNN_OP = "mkldnn::_linear_pointwise"


@contextmanager
def mkldnn_disabled():
    # Set directly: `torch.backends.mkldnn.flags()` warns about TF32 on every call.
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def ops_run(function):
    """The result of `function()` and the names of the operators it ran."""
    with profile() as profiler:
        result = function()
    return result, {event.key for event in profiler.key_averages()}


def test_linear_and_conv1d_layers_run_through_onednn_with_the_same_results():
    torch.manual_seed(0)
    layers = [nn.Linear(24, 40), nn.Linear(24, 40, bias=False), Conv1D(40, 24)]
    inputs = torch.randn(3, 5, 24)  # the kernel takes rows: leading dimensions are flattened and restored
    for layer in layers:
        with torch.no_grad():
            expected = layer(inputs)
            with onednn_linear():
                result, ops = ops_run(lambda: layer(inputs))
        assert ONEDNN_OP in ops, layer
        assert result.shape == expected.shape == (3, 5, 40)
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_transposed_weights_and_strided_or_one_dimensional_inputs():
    torch.manual_seed(0)
    weight = torch.randn(24, 40)
    strided_inputs = torch.randn(24, 14).T[::2]  # 7 rows of 24, neither row- nor column-major
    cases = [(torch.randn(7, 24), weight.T), (torch.randn(24), weight.T, torch.randn(40)), (strided_inputs, weight.T)]
    for args in cases:
        with torch.no_grad():
            expected = F.linear(*args)
            with onednn_linear():
                result, ops = ops_run(lambda: F.linear(*args))
        assert ONEDNN_OP in ops
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
    # A weight that is neither row- nor column-major goes the usual way.
    strided = torch.randn(40, 48)[:, ::2]
    inputs = torch.randn(3, 24)
    with torch.no_grad(), onednn_linear():
        result, ops = ops_run(lambda: F.linear(inputs, strided))
    assert ONEDNN_OP not in ops
    assert torch.equal(result, inputs @ strided.T)


def test_everything_else_runs_as_usual():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    inputs = torch.randn(4, 16)
    # With gradients on: the usual kernel, and gradients flow.
    with onednn_linear():
        outputs, ops = ops_run(lambda: layer(inputs))
    assert ONEDNN_OP not in ops
    outputs.sum().backward()
    assert layer.weight.grad is not None
    weight = torch.randn(8, 16)
    cases = {
        "float64": lambda: layer.double()(inputs.double()),
        "addmm with a 2-d bias": lambda: torch.addmm(torch.randn(4, 8), inputs, weight.T),
        "addmm with scaling": lambda: torch.addmm(torch.randn(8), inputs, weight.T, beta=0.5),
        # oneDNN reads a bias as a flat array: strided and expanded ones keep the usual kernel.
        "strided bias": lambda: F.linear(inputs, weight, torch.randn(16)[::2]),
        "expanded bias": lambda: F.linear(inputs, weight, torch.randn(1).expand(8)),
        "addmm with a strided bias": lambda: torch.addmm(torch.randn(24)[::3], inputs, weight.T),
    }
    for name, function in cases.items():
        torch.manual_seed(1)
        with torch.no_grad():
            expected = function()
        torch.manual_seed(1)
        with torch.no_grad(), onednn_linear():
            result, ops = ops_run(function)
        assert ONEDNN_OP not in ops, name
        assert torch.equal(result, expected), name


def test_autocast_keeps_its_lower_precision():
    layer = nn.Linear(16, 8)
    inputs = torch.randn(2, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer(inputs)
        with onednn_linear():
            result, ops = ops_run(lambda: layer(inputs))
    assert ONEDNN_OP not in ops
    assert result.dtype == torch.bfloat16
    assert torch.equal(result, expected)


def test_mkldnn_flag_turns_it_off():
    layer = nn.Linear(16, 8)
    with torch.no_grad(), mkldnn_disabled():
        assert not onednn_linear_available()
        with onednn_linear():
            _, ops = ops_run(lambda: layer(torch.randn(2, 16)))
    assert ONEDNN_OP not in ops


def test_generate_decodes_through_onednn_with_the_same_captions(tokenizer):
    model = tiny_model(tokenizer)
    image_embeds = torch.randn(3, model.config.prefix_dim, generator=torch.Generator().manual_seed(0))
    for num_beams in (1, 3):
        with mkldnn_disabled():
            expected, usual_ops = ops_run(lambda: model.generate(image_embeds=image_embeds, num_beams=num_beams))
        result, ops = ops_run(lambda: model.generate(image_embeds=image_embeds, num_beams=num_beams))
        assert ONEDNN_OP in ops and ONEDNN_OP not in usual_ops
        assert torch.equal(result, expected)


def test_generate_uses_it_for_fp32_models_on_the_cpu_only(tokenizer, monkeypatch):
    # Elsewhere the mode would only add Python work to every operator.
    entered = []

    def recording_onednn_linear():
        entered.append(True)
        return onednn_linear()

    monkeypatch.setattr(modeling_clipcap, "onednn_linear", recording_onednn_linear)
    model = tiny_model(tokenizer)
    image_embeds = torch.randn(2, model.config.prefix_dim, generator=torch.Generator().manual_seed(0))
    model.generate(image_embeds=image_embeds, max_new_tokens=2)
    assert entered == [True]
    model.to(torch.bfloat16).generate(image_embeds=image_embeds.bfloat16(), max_new_tokens=2)
    assert entered == [True]
    model.float()
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    model.generate(image_embeds=image_embeds, max_new_tokens=2)
    assert entered == [True]


def test_a_failed_generate_leaves_no_mode_behind(tokenizer):
    model = tiny_model(tokenizer)
    image_embeds = torch.randn(2, model.config.prefix_dim)
    with pytest.raises(ValueError):  # more sequences than beams: refused inside the language model's generate
        model.generate(image_embeds=image_embeds, num_beams=2, num_return_sequences=3)
    with torch.no_grad():
        _, ops = ops_run(lambda: nn.Linear(16, 8)(torch.randn(2, 16)))
    assert ONEDNN_OP not in ops


def test_only_x86_processors_use_it(monkeypatch):
    # Measured on x86-64 only; oneDNN's fp32 kernels on other processors are other code.
    monkeypatch.setattr(onednn.platform, "machine", lambda: "aarch64")
    assert not onednn_linear_available()
    with torch.no_grad(), onednn_linear():
        _, ops = ops_run(lambda: nn.Linear(16, 8)(torch.randn(2, 16)))
    assert ONEDNN_OP not in ops
