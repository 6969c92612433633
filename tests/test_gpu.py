"""On a CUDA device: the tiny-sd flow (projects/flow.toml) in fp16, end to end. Skipped without a GPU."""

from __future__ import annotations

import shutil

import pytest

from runner import executor
from runner.events import FRESH
from runner.project import load_project
from tests.conftest import ROOT, Recorder

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_the_flow_builds_in_fp16_on_cuda(tmp_path):
    shutil.copytree(ROOT / "projects" / "flow", tmp_path / "flow")
    text = (ROOT / "projects" / "flow.toml").read_text()
    text = text.replace(
        'base_model = "tiny-sd"', 'base_model = "tiny-sd"\ndevice = "cuda"\nmixed_precision = "fp16"'
    )
    (tmp_path / "flow.toml").write_text(text)
    project = load_project(tmp_path / "flow.toml")
    result = executor.build(project, executor.BuildOptions(), Recorder())
    assert result.ok, [(s.id, s.error) for s in result.steps if s.error]
    out = tmp_path / "build" / "flow"
    from safetensors import safe_open

    with safe_open(str(out / "adapters" / "dog" / "unet" / "adapter_model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    assert dtypes == {torch.float32}, "LoRA weights are trained and saved in fp32"
    assert len(list((out / "renders" / "dog").glob("*-*.png"))) == 4
    blend = (out / "blends" / "toy_dog" / "dbl.json").read_text()
    assert "relative_error" in blend
    again = executor.build(load_project(tmp_path / "flow.toml"), executor.BuildOptions(), Recorder())
    assert all(s.status == FRESH for s in again.steps)


def _train_on_cuda(folder, flow, graphs: bool, accumulation: int = 1):
    """train:dog of the flow on CUDA in fp16, 20 steps with its prior, with or without CUDA graphs (and
    without compiling, which would rule them out): the per-step losses, the UNet adapter and the log."""
    import json

    from safetensors.torch import load_file

    folder.mkdir()
    shutil.copytree(flow, folder / "flow")
    text = (
        '[project]\nbase_model = "tiny-sd"\ndevice = "cuda"\nmixed_precision = "fp16"\n\n'
        f"[train]\nresolution = 64\nsteps = 20\ncompile = false\ncuda_graphs = {str(graphs).lower()}\n"
        f"gradient_accumulation_steps = {accumulation}\n\n"
        "[lora]\nrank = 4\ntext_encoder_rank = 4\n\n"
        '[priors.dog]\nclass_prompt = "a photo of dog"\nnum_images = 2\nsteps = 5\n\n'
        '[subjects.dog]\nimages = "flow/dog"\ninstance_prompt = "a photo of sks dog"\nprior = "dog"\n'
    )
    (folder / "p.toml").write_text(text)
    recorder = Recorder()
    result = executor.build(load_project(folder / "p.toml"), executor.BuildOptions(), recorder)
    assert result.ok, [(s.id, s.error) for s in result.steps if s.error]
    out = folder / "build" / "p" / "adapters" / "dog"
    losses = json.loads((out / "dbl.json").read_text())["log"]["instance_loss"]
    logs = [e[2] for e in recorder.events if e[0] == "log" and e[1] == "train:dog"]
    weights = {
        f"{component}.{key}": value
        for component in ("unet", "text_encoder")
        for key, value in load_file(str(out / component / "adapter_model.safetensors")).items()
    }
    return losses, weights, logs


@pytest.mark.parametrize("accumulation", [1, 2])
def test_cuda_graphs_train_what_the_eager_passes_train(tmp_path, accumulation):
    flow = ROOT / "projects" / "flow"
    eager, eager_weights, eager_logs = _train_on_cuda(tmp_path / "eager", flow, False, accumulation)
    graphed, graphed_weights, logs = _train_on_cuda(tmp_path / "graphed", flow, True, accumulation)
    assert "cuda graphs: off (set in [train])" in eager_logs
    assert "cuda graphs: on (set in [train])" in logs
    assert "cuda graphs: captured the denoiser's forward and backward" in logs
    assert "cuda graphs: captured the text encoder's forward and backward" in logs
    assert not any("CUDA graphs" in line and "failed" in line for line in logs), logs
    # The replayed kernels are the eager ones, to rounding: cuBLAS may pick other fp16 algorithms for the
    # recorded stream. The losses agree to 1e-3; AdamW moves a weight by about the learning rate whatever
    # its gradient's size, so after 20 steps the weights (both adapters) differ by a few tenths of a percent
    # (0.19% on an H200, where two eager runs agree bit for bit). A replay of stale inputs or lost gradients leaves them tens of percent apart; the
    # lora_B weights start at zero, so theirs is a share of what training moved them.
    assert graphed == pytest.approx(eager, rel=1e-3)
    deviations = {
        key: float((graphed_weights[key] - value).norm()) / (float(value.norm()) + 1e-6)
        for key, value in eager_weights.items()
    }
    worst = max(deviations, key=deviations.get)
    print(
        f"graphed against eager: losses within {max(abs(g / e - 1) for g, e in zip(graphed, eager, strict=True)):.2e}, "
        f"weights within {deviations[worst]:.2e} ({worst})"
    )
    assert deviations[worst] <= 1e-2, (worst, deviations[worst])
    assert any(float(v.abs().max()) > 0 for k, v in graphed_weights.items() if "lora_B" in k)
    assert any(k.startswith("text_encoder.") for k in graphed_weights)


def test_between_loss_read_backs_a_training_step_never_waits_for_the_device(tmp_path, monkeypatch):
    """torch's sync debug mode set to error for every pass and optimizer step after the first (which
    captures the CUDA graphs): any wait for the device in them raises. The losses are read back every 10
    steps, by design; that read is let through. With captions, so that the prompt rows are looked up too."""
    from runner.training import loop

    real_pass, real_step, real_read = loop._forward_backward, loop._optimizer_step, loop._read_losses
    checked = []

    def strict(fn):
        def wrapper(run, *args):
            if run.step == 0:
                return fn(run, *args)
            torch.cuda.set_sync_debug_mode("error")
            try:
                result = fn(run, *args)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            checked.append(fn.__name__)
            return result

        return wrapper

    def read(run):
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            real_read(run)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    monkeypatch.setattr(loop, "_forward_backward", strict(real_pass))
    monkeypatch.setattr(loop, "_optimizer_step", strict(real_step))
    monkeypatch.setattr(loop, "_read_losses", read)
    shutil.copytree(ROOT / "projects" / "flow", tmp_path / "flow")
    from PIL import Image

    for n, image in enumerate(sorted((tmp_path / "flow" / "dog").glob("*.png"))):
        Image.open(image).convert("RGB").resize((80, 64)).save(image)  # random crops: encoded at each step
        image.with_suffix(".txt").write_text(f"a photo of sks dog, view {n}")
    (tmp_path / "p.toml").write_text(
        '[project]\nbase_model = "tiny-sd"\ndevice = "cuda"\nmixed_precision = "fp16"\n\n'
        "[train]\nresolution = 64\nsteps = 25\ncenter_crop = false\n\n"
        '[priors.dog]\nclass_prompt = "a photo of dog"\nnum_images = 2\nsteps = 5\n\n'
        '[subjects.dog]\nimages = "flow/dog"\ninstance_prompt = "a photo of sks dog"\nprior = "dog"\n'
        'caption_extension = ".txt"\n'
    )
    recorder = Recorder()
    result = executor.build(load_project(tmp_path / "p.toml"), executor.BuildOptions(), recorder)
    assert result.ok, [(s.id, s.error) for s in result.steps if s.error]
    logs = [e[2] for e in recorder.events if e[0] == "log" and e[1] == "train:dog"]
    assert "cuda graphs: captured the denoiser's forward and backward" in logs, logs
    assert any(line.endswith("encoded per step for 4") for line in logs), logs
    assert checked.count("_forward_backward") == 24 and checked.count("_optimizer_step") == 24


def hold_a_gib(ctx):
    """Allocate 1 GiB on the step's GPU and let it go; say what torch had reserved at the start."""
    reserved = torch.cuda.memory_reserved()
    block = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    del block
    return {"reserved_at_start": reserved, "pid": __import__("os").getpid()}


def test_a_worker_between_steps_gives_its_cached_gpu_memory_back(tmp_path):
    from runner.exec.backends import ProcessBackend
    from runner.exec.job import Hooks
    from tests.worker_jobs import render_job

    backend = ProcessBackend(None)
    try:
        runs = [
            backend.run(render_job(tmp_path, n, f"{__name__}:hold_a_gib", devices=("0",)), Hooks()).metrics
            for n in ("a", "b")
        ]
    finally:
        backend.close()
    assert runs[0]["pid"] == runs[1]["pid"]  # one worker ran both
    assert runs[1]["reserved_at_start"] < 1 << 30, runs  # the first step's freed GiB went back to the card


def test_a_pipeline_is_read_straight_onto_the_gpu_with_the_weights_a_cpu_load_has():
    from runner.models import BaseModel, load_pipeline, loading

    assert loading.loads_straight_to("cuda") == "cuda"
    base = BaseModel(kind="builtin", ref="tiny-sd")
    on_cpu = load_pipeline(base, dtype=torch.float16)
    on_gpu = load_pipeline(base, dtype=torch.float16, device="cuda")
    assert on_gpu.hf_device_map == "cuda"  # diffusers placed the weights as it read them
    for name in ("unet", "vae", "text_encoder"):
        want = getattr(on_cpu, name).state_dict()
        for key, value in getattr(on_gpu, name).state_dict().items():
            assert value.device.type == "cuda", (name, key)
            assert value.cpu().equal(want[key]), (name, key)


def test_a_rank_reads_the_pipeline_straight_onto_its_own_gpu():
    """A rank of a multi-GPU step loads onto "cuda:<rank>", having made it the current device: the weights
    are read onto it, not into host memory, and land there (on a second GPU too, where there is one)."""
    from runner.models import BaseModel, load_pipeline

    base = BaseModel(kind="builtin", ref="tiny-sd")
    for index in range(min(2, torch.cuda.device_count())):
        torch.cuda.set_device(index)
        try:
            pipe = load_pipeline(base, dtype=torch.float16, device=f"cuda:{index}")
        finally:
            torch.cuda.set_device(0)
        assert pipe.hf_device_map == "cuda"
        devices = {value.device for value in pipe.unet.state_dict().values()}
        assert devices == {torch.device("cuda", index)}, devices


def test_the_vae_leaves_the_gpu_while_the_denoiser_trains_on_cached_latents(tmp_path, monkeypatch):
    """Every latent cached: the VAE's weights wait in host memory during the steps, and are back on the GPU
    for the renders of the same build (which decode with it)."""
    from runner.training import loop

    seen = []
    real_step = loop._optimizer_step

    def step(run, *args):
        seen.append(next(run.pipe.vae.parameters()).device.type)
        return real_step(run, *args)

    monkeypatch.setattr(loop, "_optimizer_step", step)
    test_the_flow_builds_in_fp16_on_cuda(tmp_path)  # renders after training, on the shared pipeline
    assert seen and set(seen) == {"cpu"}, seen
