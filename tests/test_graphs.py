"""`[train] cuda_graphs`: the choice, and the denoiser's passes routed through a captured graph.

CUDA graphs need a CUDA device. Here stand-in captures check everything around them: StandIn runs the
module eagerly and counts its calls (what is captured, with which inputs, that every pass goes through it,
that the module is left as found); StaticReplay adds make_graphed_callables' memory (fixed input, output
and gradient tensors that each replay overwrites), so a training run through it shows that the loop
handles that memory rightly: the eager adapter, byte for byte, with gradient accumulation too. The real capture is checked in tests/test_gpu.py.
"""

from __future__ import annotations

import contextlib

import pytest

from runner.training import graphs
from tests.folders import folder_bytes
from tests.steps_fixtures import draw_images, make_prior, make_subject, model_cache, train_context

CUDA = dict(buckets=False, checkpointing=False, dropout=0.0, compile_setting="auto")


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

    def __init__(self, fail: Exception | None = None, fail_replay: Exception | None = None):
        self.fail, self.fail_replay = fail, fail_replay
        self.captures: list = []
        self.calls = 0

    def __call__(self, module, sample_args):
        self.captures.append((module, sample_args))
        if self.fail is not None:
            raise self.fail

        def run(*args):
            self.calls += 1
            if self.fail_replay is not None:
                raise self.fail_replay
            return module(*args)

        return run


class StaticReplay:
    """A capture with make_graphed_callables' memory: fixed input, output and gradient tensors that each
    replay overwrites, gradients handed to autograd as detached views of them, and the answer rebuilt from
    its tensors as the module gives it (a text encoder's model output). An eager pass stands in for the
    graph's replay, so what differs from an eager run is the memory handling alone."""

    def __init__(self):
        self.captures = 0
        self.calls = 0

    def __call__(self, module, sample_args):
        import torch
        from torch.utils import _pytree as pytree

        self.captures += 1
        surface = tuple(sample_args) + tuple(module.parameters())
        wanted = [i for i, t in enumerate(surface) if t.requires_grad]
        with torch.enable_grad():
            leaves, spec = pytree.tree_flatten(module(*sample_args))
        static_outs = [leaf.detach().clone() for leaf in leaves]
        static_grads = {i: torch.zeros_like(surface[i]) for i in wanted}
        replay = self

        class Graphed(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                for static, given in zip(sample_args, inputs[: len(sample_args)], strict=True):
                    static.copy_(given)
                with torch.enable_grad():
                    ctx.outs = pytree.tree_leaves(module(*sample_args))
                for static, out in zip(static_outs, ctx.outs, strict=True):
                    static.copy_(out.detach())
                return tuple(static.detach() for static in static_outs)

            @staticmethod
            def backward(ctx, *grads):
                pairs = [
                    (o, g) for o, g in zip(ctx.outs, grads, strict=True) if o.requires_grad and g is not None
                ]
                found = torch.autograd.grad(
                    [o for o, _ in pairs],
                    [surface[i] for i in wanted],
                    [g for _, g in pairs],
                    allow_unused=True,
                )
                unused = set()  # no gradient reaches them: None, as make_graphed_callables answers
                for i, g in zip(wanted, found, strict=True):
                    if g is None:
                        unused.add(i)
                    else:
                        static_grads[i].copy_(g)
                return tuple(
                    static_grads[i].detach() if i in static_grads and i not in unused else None
                    for i in range(len(surface))
                )

        def run(*args):
            replay.calls += 1
            return pytree.tree_unflatten(list(Graphed.apply(*args, *surface[len(sample_args) :])), spec)

        return run


@pytest.fixture
def lora_unet():
    """tiny-sd's UNet in a LoRA wrapper, as training wraps it; unwrapped afterwards."""
    import torch
    from peft import LoraConfig, get_peft_model

    unet = model_cache().pipeline().unet
    was_training, flags = unet.training, [p.requires_grad for p in unet.parameters()]
    torch.manual_seed(0)
    wrapped = get_peft_model(
        unet, LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights="gaussian")
    )
    wrapped.train()
    yield wrapped
    wrapped.unload()
    # The pipeline is shared by the session's tests: left as found.
    unet.train(was_training)
    for p, flag in zip(unet.parameters(), flags, strict=True):
        p.requires_grad_(flag)


def _inputs(batch=2, size=8):
    import torch

    g = torch.Generator().manual_seed(0)
    sample = torch.randn(batch, 4, size, size, generator=g)
    timesteps = torch.tensor([10, 500][:batch] * (batch // 2 or 1))[:batch]
    embeddings = torch.randn(batch, 77, 32, generator=g).requires_grad_(True)
    return sample, timesteps, embeddings


@contextlib.contextmanager
def installed(module, capture):
    """The module's passes through `capture`'s graph while inside: (the GraphedDenoiser, its log lines)."""
    logs: list[str] = []
    graphed = graphs.GraphedDenoiser(module, logs.append, capture=capture)
    graphed.install()
    try:
        yield graphed, logs
    finally:
        graphed.remove()


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

    capture = StandIn()
    with installed(lora_unet, capture) as (graphed, logs):
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
    assert "forward" not in vars(lora_unet)  # the module's own forward again
    prediction, _ = _pass(lora_unet, sample, timesteps, embeddings)
    assert torch.equal(prediction, expected) and capture.calls == 4


@pytest.mark.parametrize(
    "failure, calls, logs",
    [
        (
            {"fail": RuntimeError("operation not permitted when stream is capturing\nmore")},
            0,
            [
                "warning: capturing CUDA graphs failed (RuntimeError: operation not permitted when stream is "
                "capturing); it runs without"
            ],
        ),
        (
            {"fail_replay": RuntimeError("CUDA error: operation failed during capture")},
            1,
            [
                "cuda graphs: captured the denoiser's forward and backward",
                "warning: replaying CUDA graphs failed (RuntimeError: CUDA error: operation failed during "
                "capture); it runs without",
            ],
        ),
    ],
    ids=["capture", "first-replay"],
)
def test_a_failed_capture_or_first_replay_is_said_and_the_passes_run_eagerly(lora_unet, failure, calls, logs):
    import torch

    sample, timesteps, embeddings = _inputs()
    expected, expected_grads = _pass(lora_unet, sample, timesteps, embeddings)
    capture = StandIn(**failure)
    with installed(lora_unet, capture) as (graphed, said):
        for _ in range(2):
            prediction, grads = _pass(lora_unet, sample, timesteps, embeddings)
            assert torch.equal(prediction, expected)
            assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads, strict=True))
    # Tried once, not at every step.
    assert len(capture.captures) == 1 and capture.calls == calls and graphed.replays == 0
    assert said == logs


def _build(tmp_path, name, base_model, train, captions: dict | None = None):
    """A train step's outputs and log; `captions`: {image index: its caption} (.txt beside the image)."""
    import dataclasses

    from runner.steps import train as train_step

    instance = draw_images(tmp_path / "dog", max(2, len(captions or ())), size=(64, 64))
    classes = draw_images(tmp_path / "class", 2, size=(64, 64), seed=7)
    subject = make_subject(instance, prior="dog", train={"steps": 3, **train})
    if captions:
        images = sorted(instance.glob("*.png"))
        for index, caption in captions.items():
            images[index].with_suffix(".txt").write_text(caption)
        subject = dataclasses.replace(subject, caption_extension=".txt")
    logs = []
    ctx = train_context(
        tmp_path / name,
        subject,
        prior=make_prior(num_images=2),
        class_dir=classes,
        base_model=base_model,
        log=logs.append,
    )
    train_step.run(ctx)
    files = folder_bytes(ctx.out)
    return files, logs


def _force_graphs(monkeypatch, capture):
    """Graphs on as on CUDA (the choice's other conditions still hold), with `capture` for the graphs."""
    real = graphs.choose
    monkeypatch.setattr(graphs, "choose", lambda setting, device, **kw: real(setting, "cuda", **kw))
    monkeypatch.setattr(graphs, "_make_graphed", capture)


@pytest.mark.torch
@pytest.mark.parametrize("base_model", ["tiny-sd", "tiny-sdxl"])
def test_training_through_the_graph_writes_the_eager_adapter(tmp_path, monkeypatch, base_model):
    """A run whose denoiser goes through the graph's memory (a stand-in replay), with a prior and a text-
    encoder LoRA (its embeddings need gradients through the graph; SDXL adds its pooled embeddings and
    time ids), writes the adapter of an eager run, byte for byte."""
    eager, eager_logs = _build(tmp_path, "eager", base_model, {})
    assert "cuda graphs: off (auto: off on cpu)" in eager_logs

    capture = StaticReplay()
    _force_graphs(monkeypatch, capture)
    through, logs = _build(tmp_path, "graphed", base_model, {})
    assert "cuda graphs: on (auto: on cuda, static shapes)" in logs
    encoders = "the text encoders'" if base_model == "tiny-sdxl" else "the text encoder's"
    assert [line for line in logs if "captured" in line] == [
        f"cuda graphs: captured {encoders} forward and backward",
        "cuda graphs: captured the denoiser's forward and backward",
    ]  # in the order they run: the text encoders' embeddings go into the denoiser
    assert capture.captures == 2 and capture.calls == 6  # every step's passes went through both
    assert through == eager
    pipe = model_cache(base_model).pipeline()
    assert all("forward" not in vars(getattr(pipe, name)) for name in ["unet", "text_encoder"])


@pytest.mark.torch
@pytest.mark.parametrize(
    "captions, shapes_seen",
    [
        ({0: "sks dog on the grass", 1: "sks dog asleep"}, 1),  # two rows at every step, which differ
        ({0: "a photo of dog", 1: "sks dog on the grass", 2: "sks dog asleep"}, 2),  # 0: the class prompt
    ],
    ids=["other-rows", "other-shapes"],
)
def test_captions_go_through_the_prompts_graph_or_eagerly_and_train_the_eager_adapter(
    tmp_path, monkeypatch, captions, shapes_seen
):
    """With captions, a step embeds its distinct prompts: its instance image's caption and the class
    prompt, one row where they are the same. The graph, captured at the first step, replays the steps
    whose token ids have its shape, whatever their captions; the others embed eagerly. Together they train
    the eager adapter, byte for byte."""
    from runner.training import loop

    train = dict(steps=8)
    eager, _ = _build(tmp_path, "eager", "tiny-sd", train, captions)
    calls = []
    real_embed = loop._embed

    def embed(run, ids):
        calls.append((tuple(ids.shape), tuple(ids.flatten().tolist())))
        return real_embed(run, ids)

    monkeypatch.setattr(loop, "_embed", embed)
    capture = StaticReplay()
    _force_graphs(monkeypatch, capture)
    through, logs = _build(tmp_path, "graphed", "tiny-sd", train, captions)
    assert "cuda graphs: captured the text encoder's forward and backward" in logs
    shapes = [shape for shape, _ in calls]
    assert len(set(shapes)) == shapes_seen, shapes
    replayed = [ids for shape, ids in calls if shape == shapes[0]]  # the first call's shape, captured
    assert capture.calls == 8 + len(replayed)  # the denoiser at every step, the prompts at those
    if shapes_seen == 1:
        assert len(set(replayed)) == 2  # replayed with either caption
    assert through == eager


@pytest.mark.torch
def test_gradient_accumulation_through_the_graphs_memory_writes_the_eager_adapter(tmp_path, monkeypatch):
    """The graph's memory holds the parameters' gradients and the next replay overwrites them: the first
    micro-batch's are copied out before the second replays. Without that copy the stand-in trains
    another adapter (the proof that it reproduces the hazard)."""
    train = dict(gradient_accumulation_steps=2)
    eager, _ = _build(tmp_path, "eager", "tiny-sd", train)
    capture = StaticReplay()
    _force_graphs(monkeypatch, capture)
    through, logs = _build(tmp_path, "graphed", "tiny-sd", train)
    assert "cuda graphs: captured the denoiser's forward and backward" in logs
    assert "cuda graphs: captured the text encoder's forward and backward" in logs
    assert capture.calls == 12  # 3 steps of 2 micro-batches, each through both graphs' memory
    assert through == eager
    for graphed, component in [(graphs.GraphedDenoiser, "unet"), (graphs.GraphedPrompts, "text_encoder")]:
        with monkeypatch.context() as m:
            m.setattr(graphed, "own_gradients", lambda self: None)
            spoiled, _ = _build(tmp_path, f"spoiled-{component}", "tiny-sd", train)
        weights = f"{component}/adapter_model.safetensors"
        assert spoiled[weights] != eager[weights], component


def test_torchs_warning_about_the_warm_up_stream_is_not_a_builds_warning():
    """make_graphed_callables warms up on its own stream, and torch warns that the gradient accumulators
    were made on another: once the graphs are installed that warning is not shown; others still are."""
    import warnings

    import torch

    module = torch.nn.Linear(2, 2)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        graphed = graphs.GraphedDenoiser(module, print)
        stream = "The AccumulateGrad node's stream does not match the stream of the node that produced it."
        warnings.warn(stream, UserWarning, stacklevel=1)
        assert len(shown) == 1  # shown before the graphs are installed
        graphed.install()
        try:
            warnings.warn(stream, UserWarning, stacklevel=1)
            warnings.warn("another warning", UserWarning, stacklevel=1)
        finally:
            graphed.remove()
    assert [str(w.message) for w in shown] == [stream, "another warning"]


def test_a_failed_capture_of_the_prompts_graph_names_it_and_they_are_embedded_eagerly():
    import torch

    class Family:
        def encode_prompts(self, modules, token_ids):
            return modules["text_encoder"](token_ids)

    torch.manual_seed(0)
    modules = {"text_encoder": torch.nn.Embedding(10, 4), "unet": torch.nn.Linear(4, 4)}
    ids = torch.tensor([[1, 2], [3, 4]])
    expected = modules["text_encoder"](ids)
    capture, logs = StandIn(fail=RuntimeError("operation not permitted when stream is capturing")), []
    graphed = graphs.GraphedPrompts(Family(), modules, ["text_encoder"], logs.append, capture=capture)
    graphed.install()
    for _ in range(2):
        assert torch.equal(graphed(ids), expected)
    ((module, sample_args),) = capture.captures  # tried once; its parameters are the text encoder's alone
    assert {id(p) for p in module.parameters()} == {id(p) for p in modules["text_encoder"].parameters()}
    assert torch.equal(sample_args[0], ids)
    assert logs == [
        "warning: capturing CUDA graphs of the text encoder failed (RuntimeError: operation not permitted "
        "when stream is capturing); it runs without"
    ]
    with torch.no_grad():  # no gradients: never through the graphs
        assert torch.equal(graphed(ids), expected)
