"""`[train] cuda_graphs`: the choice, and the denoiser's passes routed through a captured graph.

CUDA graphs need a CUDA device; here a stand-in capture (it runs the same module eagerly and counts its
calls) checks everything around it: what is captured, with which inputs, that every training pass goes
through it, that the result is the eager one, and that the module is left as it was found. The real
capture is checked in tests/test_gpu.py.
"""

from __future__ import annotations

import pytest

from runner.training import graphs
from tests.steps_fixtures import draw_images, make_prior, make_subject, model_cache, train_context

CUDA = dict(buckets=False, accumulation=1, checkpointing=False, dropout=0.0, compile_setting="auto")


@pytest.mark.parametrize(
    "setting, device, changes, on, why",
    [
        ("auto", "cuda", {}, True, "auto: on cuda, static shapes"),
        ("auto", "cuda:1", {}, True, "auto: on cuda, static shapes"),
        (True, "cuda", {}, True, "set in [train]"),
        (False, "cuda", {}, False, "set in [train]"),
        ("auto", "cpu", {}, False, "auto: off on cpu"),
        ("auto", "mps", {}, False, "auto: off on mps"),
        (True, "cpu", {}, False, "set in [train], but off on cpu"),
        ("auto", "cuda", {"buckets": True}, False, "auto: buckets change the shapes"),
        (
            "auto",
            "cuda",
            {"accumulation": 2},
            False,
            "auto: gradient accumulation needs gradients kept across passes",
        ),
        (True, "cuda", {"checkpointing": True}, False, "set in [train], but gradient checkpointing is on"),
        ("auto", "cuda", {"dropout": 0.1}, False, "auto: LoRA dropout draws random masks"),
        ("auto", "cuda", {"compile_setting": True}, False, "auto: compile = true"),
        (True, "cuda", {"compile_setting": False}, True, "set in [train]"),
    ],
)
def test_choice(setting, device, changes, on, why):
    assert graphs.choose(setting, device, **{**CUDA, **changes}) == (on, why)
    assert graphs.describe(on, why) == f"cuda graphs: {'on' if on else 'off'} ({why})"


def test_a_bad_setting_is_refused():
    with pytest.raises(ValueError, match="cuda_graphs must be true, false or 'auto'"):
        graphs.choose("yes", "cuda")


class StandIn:
    """A capture that records what it was given and runs the module eagerly, counting its calls."""

    def __init__(self, fail: Exception | None = None):
        self.fail = fail
        self.captures: list = []
        self.calls = 0

    def __call__(self, module, sample_args):
        self.captures.append((module, sample_args))
        if self.fail is not None:
            raise self.fail

        def run(*args):
            self.calls += 1
            return module(*args)

        return run


@pytest.fixture
def lora_unet():
    """tiny-sd's UNet in a LoRA wrapper, as training wraps it; unwrapped afterwards."""
    import torch
    from peft import LoraConfig, get_peft_model

    unet = model_cache().pipeline().unet
    torch.manual_seed(0)
    wrapped = get_peft_model(
        unet, LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights="gaussian")
    )
    wrapped.train()
    yield wrapped
    wrapped.unload()


def _inputs(batch=2, size=8):
    import torch

    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, size, size, generator=g)
    timesteps = torch.tensor([10, 500][:batch] * (batch // 2 or 1))[:batch]
    embeddings = torch.randn(batch, 77, 32, generator=g).requires_grad_(True)
    return sample, timesteps, embeddings


def _pass(module, sample, timesteps, embeddings):
    """The prediction and the gradients of its sum (LoRA parameters, then the embeddings)."""
    import torch

    params = [p for p in module.parameters() if p.requires_grad]
    prediction = module(sample, timesteps, embeddings).sample
    grads = torch.autograd.grad(prediction.square().sum(), params + [embeddings])
    return prediction.detach(), grads


def test_every_pass_goes_through_the_graph_and_gives_the_eager_result(lora_unet):
    import torch

    sample, timesteps, embeddings = _inputs()
    expected, expected_grads = _pass(lora_unet, sample, timesteps, embeddings)

    logs, capture = [], StandIn()
    graphed = graphs.GraphedDenoiser(lora_unet, logs.append, capture=capture)
    graphed.install()
    try:
        for _ in range(3):
            prediction, grads = _pass(lora_unet, sample, timesteps, embeddings)
            assert torch.equal(prediction, expected)
            assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads, strict=True))
        # Captured once, with copies of the first call's inputs (their kind and requires_grad kept).
        ((module, sample_args),) = capture.captures
        assert capture.calls == graphed.replays == 3
        assert logs == ["cuda graphs: captured the denoiser's forward and backward"]
        assert [a.requires_grad for a in sample_args] == [False, False, True]
        assert all(
            a is not b and torch.equal(a, b)
            for a, b in zip(sample_args, (sample, timesteps, embeddings), strict=True)
        )
        trained = {id(p) for p in lora_unet.parameters() if p.requires_grad}
        assert trained and trained <= {id(p) for p in module.parameters()}  # the graphs' parameters
        # A call of other shapes, or without gradients, runs eagerly.
        other = _inputs(batch=1)
        _pass(lora_unet, *other)
        with torch.no_grad():
            lora_unet(sample, timesteps, embeddings)
        assert capture.calls == 3
        # return_dict=False answers a tuple, as the module does.
        (prediction,) = lora_unet(sample, timesteps, embeddings, return_dict=False)
        assert torch.equal(prediction.detach(), expected)
    finally:
        graphed.remove()
    assert "forward" not in vars(lora_unet)  # the module's own forward again
    prediction, _ = _pass(lora_unet, sample, timesteps, embeddings)
    assert torch.equal(prediction, expected) and capture.calls == 4


def test_a_failed_capture_is_said_and_the_passes_run_eagerly(lora_unet):
    import torch

    sample, timesteps, embeddings = _inputs()
    expected, _ = _pass(lora_unet, sample, timesteps, embeddings)
    logs, capture = [], StandIn(fail=RuntimeError("operation not permitted when stream is capturing\nmore"))
    graphed = graphs.GraphedDenoiser(lora_unet, logs.append, capture=capture)
    graphed.install()
    try:
        for _ in range(2):
            prediction, _ = _pass(lora_unet, sample, timesteps, embeddings)
            assert torch.equal(prediction, expected)
    finally:
        graphed.remove()
    assert len(capture.captures) == 1  # tried once, not at every step
    assert logs == [
        "warning: capturing CUDA graphs failed (RuntimeError: operation not permitted when stream is "
        "capturing); it runs without"
    ]


@pytest.mark.torch
@pytest.mark.parametrize("base_model", ["tiny-sd", "tiny-sdxl"])
def test_training_through_the_graph_writes_the_eager_adapter(tmp_path, monkeypatch, base_model):
    """A run whose denoiser goes through the (stand-in) graph, with a prior and a text-encoder LoRA (its
    embeddings need gradients through the graph; SDXL adds its pooled embeddings and time ids)."""
    from runner.steps import train

    instance = draw_images(tmp_path / "dog", 2, size=(64, 64))
    classes = draw_images(tmp_path / "class", 2, size=(64, 64), seed=7)
    prior = make_prior(num_images=2)
    subject = make_subject(instance, prior="dog", train=dict(steps=3, cuda_graphs=True))

    def build(name, **kw):
        logs = []
        ctx = train_context(
            tmp_path / name,
            subject,
            prior=prior,
            class_dir=classes,
            base_model=base_model,
            log=logs.append,
            **kw,
        )
        train.run(ctx)
        return {p.name: p.read_bytes() for p in sorted(ctx.out.rglob("*")) if p.is_file()}, logs

    eager, eager_logs = build("eager")
    assert "cuda graphs: off (set in [train], but off on cpu)" in eager_logs

    real_choose = graphs.choose
    monkeypatch.setattr(
        graphs,
        "choose",
        lambda setting, device, **kw: (True, "forced") if setting else real_choose(setting, device, **kw),
    )
    capture = StandIn()
    monkeypatch.setattr(graphs, "_make_graphed", capture)
    through, logs = build("graphed")
    assert "cuda graphs: on (forced)" in logs
    assert "cuda graphs: captured the denoiser's forward and backward" in logs
    assert len(capture.captures) == 1 and capture.calls == 3  # every step's pass went through it
    assert through == eager
    unet = model_cache(base_model).pipeline().unet
    assert "forward" not in vars(unet)
