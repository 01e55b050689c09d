"""The fast decoding paths (a static cache, a compiled decoding step) give the tokens of the plain path."""

import pytest
import torch
from conftest import tiny_model, tiny_processor
from transformers import CompileConfig, GenerationMixin

from clipcap_hf.onednn import CPU_LINEAR_ENV, _RoutedForward, onednn_linear_available


@pytest.fixture(params=["mlp", "transformer"])
def model(request, tokenizer):
    return tiny_model(tokenizer, request.param, text_dropout=0.0)


def embeds(model, count, seed=0):
    return torch.randn(count, model.config.prefix_dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_static_cache_gives_the_tokens_of_the_dynamic_cache(model, num_beams):
    x = embeds(model, 3)
    plain = model.generate(image_embeds=x, max_new_tokens=10, num_beams=num_beams, do_sample=False)
    static = model.generate(
        image_embeds=x, max_new_tokens=10, num_beams=num_beams, do_sample=False, cache_implementation="static"
    )
    assert torch.equal(static, plain)


def test_static_cache_with_a_prompt_from_pixels(mlp_model, tokenizer, images):
    processor = tiny_processor(tokenizer)
    inputs = processor(images=images[:2], text=["a photo of", "the"], return_tensors="pt")
    plain = mlp_model.generate(**inputs, max_new_tokens=6, do_sample=False)
    static = mlp_model.generate(**inputs, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(static, plain)


def static_compiled_generate(model, image_embeds, backend, **kwargs):
    """`generate` with a static cache and a decoding step compiled by `backend`, on the CPU too."""
    compile_config = CompileConfig(fullgraph=True, backend=backend, mode=None)
    # transformers compiles the step on accelerators only; its own switch (which its tests use) compiles it on the
    # CPU too, so that the compiled path's tokens are checked here.
    compile_config._compile_all_devices = True
    return model.generate(
        image_embeds=image_embeds, cache_implementation="static", compile_config=compile_config, **kwargs
    )


def compiled_generate(model, image_embeds, backend, **kwargs):
    """`static_compiled_generate` traced afresh; asserts the step was traced whole."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    generated = static_compiled_generate(model, image_embeds, backend, **kwargs)
    assert counters["stats"]["unique_graphs"] >= 1  # the decoding step did go through torch.compile
    assert not counters["graph_break"]
    return generated


def test_a_compile_config_compiles_the_greedy_decoding_step_on_the_cpu_with_the_same_tokens(model):
    # (transformers compiles the greedy and sampling loops' step, not beam search's.)
    x = embeds(model, 3)
    plain = model.generate(image_embeds=x, max_new_tokens=8, do_sample=False)
    # The "eager" backend traces the step as inductor would (the whole of it, fullgraph) without compiling C++.
    compiled = compiled_generate(model, x, "eager", max_new_tokens=8, do_sample=False)
    assert torch.equal(compiled, plain)


def test_the_onednn_routing_leaves_a_compiled_step_to_inductor(mlp_model, monkeypatch):
    # Routed through oneDNN inside the traced graph, inductor's lowering would fail ("weight must be a graph constant").
    monkeypatch.setenv(CPU_LINEAR_ENV, "onednn")
    x = embeds(mlp_model, 2)
    plain = mlp_model.generate(image_embeds=x, max_new_tokens=5, do_sample=False)
    assert torch.equal(compiled_generate(mlp_model, x, "inductor", max_new_tokens=5, do_sample=False), plain)


@pytest.mark.skipif(not onednn_linear_available(), reason="needs PyTorch with oneDNN on x86-64")
def test_a_compiled_step_is_traced_once_over_generate_calls(mlp_model, monkeypatch):
    # Each `generate()` routes the linear layers again (onednn.py); torch.compile guards on each layer's forward, so
    # a new routed forward per call would trace the step anew every call, until dynamo gives up and runs it eagerly.
    from torch._dynamo.utils import counters

    routed = []
    original_generate = GenerationMixin.generate

    def generate_seeing_the_routing(self, *args, **kwargs):
        routed.append(any(isinstance(vars(layer).get("forward"), _RoutedForward) for layer in self.modules()))
        return original_generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", generate_seeing_the_routing)
    monkeypatch.setenv(CPU_LINEAR_ENV, "onednn")
    x = embeds(mlp_model, 2)
    first = compiled_generate(mlp_model, x, "eager", max_new_tokens=5, do_sample=False)
    graphs = counters["stats"]["unique_graphs"]
    again = static_compiled_generate(mlp_model, x, "eager", max_new_tokens=5, do_sample=False)
    assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(again, first)
    assert routed == [True, True]  # both calls ran with their layers routed
