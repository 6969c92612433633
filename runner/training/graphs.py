"""Whether the denoiser's forward and backward, and those of the text encoders that train, are captured as
CUDA graphs (`[train] cuda_graphs`), and capturing them. torch is imported inside functions.

A small batch leaves a big GPU waiting on kernel launches, not on arithmetic: an SD 1.5 step launches
thousands of kernels, each a few microseconds of host time. A CUDA graph records a pass's launches once
and replays them as one, so the host no longer paces the device. Capturing costs a warm-up pass and a
recorded one (no compiling), and replaying runs the kernels the eager pass runs, so the result is the eager
one to rounding (cuBLAS may pick other algorithms for a recorded stream).

A graph replays fixed shapes on fixed memory, so it is captured where every step has the same shapes and
nothing in the pass draws random numbers or waits for the host:

- a CUDA device, and no buckets (each bucket has its shapes);
- no gradient checkpointing (it recomputes the forward pass inside the backward one);
- no UNet LoRA dropout (its random masks would differ from an eager run's);
- not `compile = true`: a compiled denoiser has fused its launches already. Under "auto" the graphs
  serve and nothing compiles: capturing costs two passes, compiling minutes.

The graph's backward leaves the parameters' gradients in its own memory, which the next replay
overwrites; with gradient accumulation they are copied out after a step's first micro-batch
(`own_gradients`), and the later ones add to the copies.

The text encoders that train are a second graph, of the family's embedding of the prompts (token ids in,
the embeddings out: `GraphedPrompts`), unless their LoRA dropout draws masks; a step whose distinct
prompts (captions) make other shapes embeds them eagerly.

"auto" captures where all of these hold; `true` asks for it, and the log says why it is off where one does
not hold. Each graph is captured at the first step, with that step's inputs; a later call whose inputs
differ in shape or kind runs eagerly. Where capturing or the first replay fails (an
operation CUDA cannot record), the log says why and the run goes on eagerly from the same step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from runner.training import switches

# Passes make_graphed_callables runs before recording, on a stream of its own (not the one it records on):
# the first loads the kernels and makes the libraries' handles. A second or third (torch's default is 3,
# for DistributedDataParallel's buckets) initialises nothing more here: on an H200 the graphs train the
# same weights after 1 as after 3.
WARM_UP_PASSES = 1


def choose(
    setting,
    device: str,
    *,
    buckets: bool = False,
    checkpointing: bool = False,
    dropout: float = 0.0,
    compile_setting=False,
) -> tuple[bool, str]:
    """(on, why) for a `cuda_graphs` setting: true, false or "auto" (`compile_setting`: [train] compile,
    which rules graphs out only when it is true)."""
    switches.check(setting, "cuda_graphs")
    if setting is False:
        return False, "set in [train]"
    kind = device.split(":")[0]
    blocked = (
        (kind != "cuda", f"off on {kind}"),
        (buckets, "buckets change the shapes"),
        (checkpointing, "gradient checkpointing is on"),
        (dropout > 0, "LoRA dropout draws random masks"),
        (compile_setting is True, "compile = true"),
    )
    why = next((why for hit, why in blocked if hit), None)
    if setting is True:
        return (False, f"set in [train], but {why}") if why else (True, "set in [train]")
    return (False, f"auto: {why}") if why else (True, "auto: on cuda, static shapes")


def describe(on: bool, why: str) -> str:
    """The log line of the choice."""
    return switches.describe("cuda graphs", on, why)


ACCUMULATE_GRAD_STREAM = "The AccumulateGrad node's stream does not match"


def _quiet_the_warm_up_stream() -> None:
    """make_graphed_callables warms the passes up on a stream of its own, and torch then warns (at length,
    as a build's warning) that the parameters' gradient accumulators were made on another stream and that
    this "may break CUDA graph capture". A capture that fails says so itself, and the replayed passes
    train what the eager ones train (tests/test_gpu.py): here it says nothing."""
    import warnings

    warnings.filterwarnings("ignore", message=ACCUMULATE_GRAD_STREAM, category=UserWarning)


def _signature(args) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device, a.requires_grad) for a in args)


class _Graphed:
    """LoRA-wrapped modules' training passes as CUDA graphs, captured at the first call and replayed after;
    its subclasses say how the module is called. `install` before the run, `remove` after (which frees the
    graphs). `capture(module, sample_args)` makes the graphed callable (torch.cuda.make_graphed_callables;
    a test may stand in its own)."""

    what = "the module"  # in the log: "captured <what>'s forward and backward"

    def __init__(self, module, log: Callable[[str], None], capture: Callable | None = None):
        self.module, self.log = module, log
        self.capture = capture or _make_graphed
        self.graphed = None  # positional tensors -> what the module answers
        self.signature = None
        self.failed = False
        self.replays = 0

    def own_gradients(self) -> None:
        """Give the parameters gradients of their own. The graph's backward writes the parameters'
        gradients into its own memory, and autograd takes them from there as they are, so the next replay
        would overwrite them: with gradient accumulation, the loop calls this after the first
        micro-batch's backward pass, and the next ones add to these copies."""
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad = p.grad.clone()

    def install(self) -> None:
        _quiet_the_warm_up_stream()

    def remove(self) -> None:
        self.graphed = None  # frees the graphs' memory pool with them

    def _replay(self, positional_of: Callable, args: tuple, eager: Callable):
        """The graph's answer to `args` (captured first, from `positional_of()`, the module called with
        tensors only), or `eager()` where it cannot answer: other shapes, a failed capture or first
        replay."""
        if self.graphed is None and not self._capture(positional_of(), args):
            return eager()
        if _signature(args) != self.signature:
            return eager()
        try:
            answer = self.graphed(*args)
        except Exception as exc:  # noqa: BLE001 - the first replay, as a capture, may fail; the eager pass works
            if self.replays:
                raise
            self._give_up("replaying", exc)
            return eager()
        self.replays += 1
        return answer

    def _capture(self, positional, args) -> bool:
        """Capture the graphs with `args`' shapes; on failure, say why and stay eager."""
        import torch

        sample_args = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        device_type = args[0].device.type
        try:
            # make_graphed_callables asks for autocast without its cast cache; the casts are recorded.
            with torch.autocast(
                device_type,
                dtype=torch.get_autocast_dtype(device_type),
                enabled=torch.is_autocast_enabled(device_type),
                cache_enabled=False,
            ):
                self.graphed = self.capture(positional, sample_args)
        except Exception as exc:  # noqa: BLE001 - any failure to record leaves the eager pass, which works
            self._give_up("capturing", exc)
            return False
        self.signature = _signature(args)
        whose = self.what + ("'" if self.what.endswith("s") else "'s")
        self.log(f"cuda graphs: captured {whose} forward and backward")
        return True

    def _give_up(self, doing: str, exc: BaseException) -> None:
        """Say why the graphs failed; the passes run eagerly from now on."""
        self.failed, self.graphed = True, None
        self.log(
            f"warning: {doing} CUDA graphs {self.failing}failed ({switches.reason(exc)}); it runs without"
        )

    @property
    def failing(self) -> str:
        """What a failure names, before "failed": the graphs of what."""
        return f"of {self.what} "


class GraphedDenoiser(_Graphed):
    """The denoiser, called as the families call it, `module(sample, timestep, encoder_hidden_states,
    added_cond_kwargs=None)`, answering as the module does (`.sample`, or a tuple with return_dict=False).
    """

    what = "the denoiser"
    failing = ""  # "capturing CUDA graphs failed": the graphs, as they were first the denoiser's alone

    def __init__(self, module, log: Callable[[str], None], capture: Callable | None = None):
        super().__init__(module, log, capture)
        self.original = None  # the module's own forward
        self.added_keys: tuple[str, ...] = ()

    def install(self) -> None:
        """In place: the module's own forward goes through the graphs from now on."""
        super().install()
        self.original = self.module.forward
        self.module.forward = self.forward  # an instance attribute: nn.Module.__call__ finds it first

    def remove(self) -> None:
        """The module's own forward again."""
        if self.original is not None:
            del self.module.forward
            self.original = None
        super().remove()

    def forward(
        self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None, return_dict=True, **rest
    ):
        import torch

        def eager():
            kwargs = dict(rest)
            if added_cond_kwargs is not None:
                kwargs["added_cond_kwargs"] = added_cond_kwargs
            return self.original(sample, timestep, encoder_hidden_states, return_dict=return_dict, **kwargs)

        if self.failed or rest or not torch.is_grad_enabled() or not torch.is_tensor(timestep):
            return eager()
        keys = tuple(sorted(added_cond_kwargs)) if added_cond_kwargs else ()
        args = (sample, timestep, encoder_hidden_states, *(added_cond_kwargs[k] for k in keys))
        if self.graphed is None:
            self.added_keys = keys
        elif keys != self.added_keys:
            return eager()
        positional = functools.partial(_positional, self.module, self.original, keys)
        prediction = self._replay(positional, args, eager)
        if not torch.is_tensor(prediction):  # the eager answer, as the module gives it
            return prediction
        if not return_dict:
            return (prediction,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=prediction)


class GraphedPrompts(_Graphed):
    """The embeddings of the prompts by the text encoders that train, as the family makes them
    (`family.encode_prompts(modules, token_ids)`: token ids in, the embeddings the denoiser takes out), as
    one graph: called with the token ids (a tensor, or a tuple of them for SDXL's two encoders), it
    answers what encode_prompts answers. Only those embeddings are the graph's outputs, so a layer whose
    output no embedding uses (SDXL's first encoder's last) gets no gradient, as in an eager pass."""

    def __init__(self, family, modules: dict, encoders: list[str], log, capture: Callable | None = None):
        super().__init__(_encoders(modules, encoders), log, capture)
        self.family, self.modules = family, modules
        self.what = "the text encoder" if len(encoders) == 1 else "the text encoders"

    def __call__(self, token_ids):  # nothing is put in place: the loop calls this object
        import torch

        def eager():
            return self.family.encode_prompts(self.modules, token_ids)

        args = tuple(token_ids) if isinstance(token_ids, tuple) else (token_ids,)
        if self.failed or not torch.is_grad_enabled() or not all(torch.is_tensor(a) for a in args):
            return eager()
        positional = functools.partial(_prompts_positional, self.family, self.modules, self.module)
        return self._replay(positional, args, eager)


def _positional(module, forward, added_keys):
    """`module` called with tensors only, as make_graphed_callables calls it (torch imported here)."""
    import torch

    class Positional(torch.nn.Module):
        """The denoiser called with tensors only, as make_graphed_callables calls it."""

        def __init__(self, module, forward, added_keys):
            super().__init__()
            self.denoiser = module  # a submodule: its parameters are the graphs' parameters
            self.call = forward
            self.added_keys = added_keys

        def forward(self, sample, timestep, encoder_hidden_states, *added):
            kwargs = {"added_cond_kwargs": dict(zip(self.added_keys, added, strict=True))} if added else {}
            return self.call(sample, timestep, encoder_hidden_states, return_dict=False, **kwargs)[0]

    return Positional(module, forward, added_keys)


def _encoders(modules: dict, names: list[str]):
    """The text encoders `names` of `modules` as one module, whose parameters are theirs."""
    import torch

    return torch.nn.ModuleDict({name: modules[name] for name in names})


def _prompts_positional(family, modules: dict, encoders):
    """encode_prompts called with token ids alone, as make_graphed_callables calls it (torch imported
    here); `encoders` (the text encoders' ModuleDict) holds the graphs' parameters."""
    import torch

    class Positional(torch.nn.Module):
        """The family's encode_prompts, called with the token ids alone."""

        def __init__(self):
            super().__init__()
            self.encoders = encoders  # a submodule: its parameters are the graphs' parameters

        def forward(self, *token_ids):
            return family.encode_prompts(modules, token_ids if len(token_ids) > 1 else token_ids[0])

    return Positional()


def _make_graphed(module, sample_args):
    import torch

    return torch.cuda.make_graphed_callables(
        module, sample_args, num_warmup_iters=WARM_UP_PASSES, allow_unused_input=True
    )
