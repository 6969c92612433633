"""The train step on tiny-sd: what it writes loads everywhere, it learns, it resumes exactly."""

from __future__ import annotations

import json

import pytest

from runner.steps import KOHYA_STEM, StepError, StepInterrupted
from tests import steps_fixtures
from tests.folders import folder_bytes
from tests.steps_fixtures import (
    DREAMBENCH,
    make_prior,
    make_subject,
    model_cache,
    run_train,
    stop_at,
    train_context,
)

pytestmark = pytest.mark.torch


images = steps_fixtures.train_images  # the fixture, as `images`


# The recipe's text-encoder targets (q_proj, v_proj): the kohya file must load in diffusers with them.
TE_TARGETS = dict(text_encoder_target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, images):
    """Three short runs: seed 0 twice, seed 1 once (with a prior and a text-encoder LoRA)."""
    instance, classes = images
    prior = make_prior(num_images=4)
    subject = make_subject(instance, prior="dog", train=dict(steps=3, batch_size=2), lora=TE_TARGETS)
    outs = {}
    for label, seed in (("a", 0), ("b", 0), ("c", 1)):
        tmp = tmp_path_factory.mktemp(f"train-{label}")
        ctx = train_context(tmp, subject, prior=prior, class_dir=classes, seed=seed)
        outs[label] = (ctx.out, run_train(ctx))
    return outs


def test_prior_preservation_loss_keeps_instance_and_class_apart():
    import torch

    from runner.training import prior_preservation_loss

    target = torch.zeros(4, 1, 2, 2)
    pred = torch.zeros(4, 1, 2, 2)
    pred[:2] = 1.0  # batch 2: [instance, instance, class, class]; only the instance halves are off
    total, instance, prior = prior_preservation_loss(pred, target, 0.5)
    assert instance.item() == 1.0 and prior.item() == 0.0 and total.item() == 1.0
    pred[:2], pred[2:] = 0.0, 2.0
    total, instance, prior = prior_preservation_loss(pred, target, 0.5)
    assert instance.item() == 0.0 and prior.item() == 4.0 and total.item() == 2.0
    total, instance, prior = prior_preservation_loss(pred, target, None)
    assert instance.item() == 2.0 and prior.item() == 0.0


def test_example_order_visits_every_image_each_epoch():
    from runner.training.data import ExampleOrder

    order = ExampleOrder(seed=0, n_instance=3, n_class=5)
    epoch = [order(p) for p in range(5)]
    assert sorted(c for _, c in epoch) == [0, 1, 2, 3, 4]
    assert {i for i, _ in epoch} == {0, 1, 2}
    assert [order(p) for p in range(10)] == [ExampleOrder(0, 3, 5)(p) for p in range(10)]
    assert [order(p) for p in range(5, 10)] != epoch  # a new shuffle each epoch


def test_outputs_load_the_way_users_load_them(trained):
    """The guide's PEFT code, diffusers' load_lora_weights on both single files: one model, same outputs."""
    import torch
    from peft import PeftModel

    from runner.adapters import DIFFUSERS_WEIGHTS
    from runner.models import load_pipeline
    from runner.pipeline_adapters import unload_adapters

    dog, crochet = trained["a"][0], trained["c"][0]
    base = model_cache().base
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 32, 32, generator=g), torch.tensor([500])
    ids = (
        load_pipeline(base)
        .tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt")
        .input_ids
    )

    def outputs(pipe):
        with torch.no_grad():
            hidden = pipe.text_encoder(ids)[0]
            return pipe.unet(x, t, hidden).sample, hidden

    pipe = load_pipeline(base)
    plain = outputs(pipe)
    # The guide, line by line.
    pipe.unet = PeftModel.from_pretrained(pipe.unet, dog / "unet", adapter_name="dog")
    pipe.text_encoder = PeftModel.from_pretrained(pipe.text_encoder, dog / "text_encoder", adapter_name="dog")
    peft_out = outputs(pipe)
    pipe.unet.load_adapter(crochet / "unet", adapter_name="crochet")
    pipe.text_encoder.load_adapter(crochet / "text_encoder", adapter_name="crochet")
    pipe.unet.add_weighted_adapter(["crochet", "dog"], [1.0, 1.05], "crochet_dog", combination_type="cat")
    pipe.text_encoder.add_weighted_adapter(
        ["crochet", "dog"], [1.0, 1.05], "crochet_dog", combination_type="cat"
    )
    pipe.unet.set_adapter("crochet_dog")
    pipe.text_encoder.set_adapter("crochet_dog")
    blended = outputs(pipe)
    assert not torch.allclose(peft_out[0], plain[0], atol=1e-6)
    assert not torch.allclose(blended[0], peft_out[0], atol=1e-6)
    config = json.loads((dog / "text_encoder" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-sd"

    for weight_name in (
        DIFFUSERS_WEIGHTS,
        f"{KOHYA_STEM}.safetensors",
    ):  # named dog.safetensors when committed
        pipe = load_pipeline(base)
        pipe.load_lora_weights(str(dog), weight_name=weight_name, adapter_name="dog")
        got = outputs(pipe)
        torch.testing.assert_close(got[0], peft_out[0], rtol=0, atol=1e-4, msg=weight_name)
        torch.testing.assert_close(got[1], peft_out[1], rtol=0, atol=1e-4, msg=weight_name)
        unload_adapters(pipe)


def test_same_seed_same_bytes_other_seed_other_bytes(trained):
    a, b, c = (folder_bytes(trained[k][0]) for k in "abc")
    assert a == b
    assert a["unet/adapter_model.safetensors"] != c["unet/adapter_model.safetensors"]
    info = json.loads(a["dbl.json"])
    assert info["steps"] == 3 and info["seed"] == 0 and info["base_model"] == "tiny-sd"
    assert info["prior"]["loss_weight"] == 1.0 and info["lora"]["rank"] == 4
    assert set(info["loss"]) >= {
        "instance_loss_first",
        "instance_loss_last",
        "prior_loss_first",
        "prior_loss_last",
    }
    metrics = trained["a"][1]
    assert metrics["steps"] == 3 and metrics["resumed_from"] is None
    assert metrics["loss_first"] == info["loss"]["loss_first"]


def _denoising_loss(pipe, files, resolution=64) -> float:
    """Instance loss on fixed noise and timesteps (the same numbers before and after training)."""
    import torch
    import torch.nn.functional as F

    from runner.images import prepare

    pixels = torch.stack([prepare(f, resolution) for f in files])
    ids = pipe.tokenizer(
        ["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        hidden = pipe.text_encoder(ids)[0].expand(len(files), -1, -1)
        losses = []
        for t in (100, 300, 500, 700, 900):
            noise = torch.randn(latents.shape, generator=g)
            timesteps = torch.full((len(files),), t)
            noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
            losses.append(F.mse_loss(pipe.unet(noisy, timesteps, hidden).sample, noise).item())
    return sum(losses) / len(losses)


def test_training_lowers_the_instance_loss(tmp_path, images):
    from runner.imagefiles import list_images
    from runner.models import load_pipeline
    from runner.pipeline_adapters import load_adapter_into

    instance, _ = images
    files = list_images(instance)[:2]
    subset = tmp_path / "two"
    subset.mkdir()
    for f in files:
        (subset / f.name).write_bytes(f.read_bytes())
    # A random tiny UNet learns slowly: a high learning rate and every attention projection.
    lora = dict(rank=8, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    subject = make_subject(
        subset, train=dict(steps=20, learning_rate=1e-2, train_text_encoder=False), lora=lora
    )
    ctx = train_context(tmp_path, subject)
    metrics = run_train(ctx)
    assert not (ctx.out / "text_encoder").exists()
    pipe = load_pipeline(model_cache().base)
    before = _denoising_loss(pipe, files)
    load_adapter_into(pipe, ctx.out, "dog")
    after = _denoising_loss(pipe, files)
    assert after < 0.98 * before, (before, after, metrics)
    assert metrics["loss_last"] < metrics["loss_first"]


def test_interrupted_and_resumed_run_gives_the_same_bytes(tmp_path, images):
    """Random crops, flips, LoRA dropout, a prior and a text-encoder LoRA: resume repeats them all."""
    instance, classes = images
    prior = make_prior(num_images=4)
    subject = make_subject(
        instance,
        prior="dog",
        train=dict(steps=5, batch_size=2, center_crop=False, random_flip=True, checkpoint_every=2),
        lora=dict(dropout=0.1, text_encoder_dropout=0.1),
    )
    whole = train_context(tmp_path, subject, prior=prior, class_dir=classes, work=tmp_path / "w1")
    run_train(whole)

    first = train_context(
        tmp_path, subject, prior=prior, class_dir=classes, work=tmp_path / "w2", should_stop=stop_at(3)
    )
    with pytest.raises(StepInterrupted, match="after step 3"):
        run_train(first)
    assert sorted(p.name for p in (tmp_path / "w2").glob("checkpoint-*")) == ["checkpoint-3"]
    logs = []
    again = train_context(
        tmp_path, subject, prior=prior, class_dir=classes, work=tmp_path / "w2", log=logs.append
    )
    metrics = run_train(again)
    assert "resuming from checkpoint-3" in logs
    assert metrics["resumed_from"] == 3
    assert folder_bytes(again.out) == folder_bytes(whole.out)


def test_nan_loss_is_an_error_and_keeps_the_last_checkpoint(tmp_path, images, monkeypatch):
    import torch

    from runner.training import loop

    instance, _ = images
    real = loop.prior_preservation_loss
    calls = []

    def poisoned(pred, target, weight, example_weights=None):
        calls.append(1)
        total, inst, prior = real(pred, target, weight, example_weights)
        if len(calls) == 3:
            return total * float("nan"), inst * float("nan"), prior
        return total, inst, prior

    monkeypatch.setattr(loop, "prior_preservation_loss", poisoned)
    subject = make_subject(instance, train=dict(steps=4, checkpoint_every=1, train_text_encoder=False))
    ctx = train_context(tmp_path, subject)
    with pytest.raises(StepError, match="loss became nan at step 3") as raised:
        run_train(ctx)
    assert str(raised.value).endswith("checkpoint-2, the last good checkpoint, is kept")
    assert sorted(p.name for p in ctx.work.glob("checkpoint-*")) == ["checkpoint-2"]
    assert torch.isfinite(
        torch.tensor(
            json.loads((ctx.work / "checkpoint-2" / "state.json").read_text())["history"]["instance"]
        )
    ).all()


def test_non_finite_latents_of_random_crops_stop_the_run_with_the_vaes_error(tmp_path, images, monkeypatch):
    instance, _ = images
    vae = model_cache().pipeline().vae
    real = vae.encode
    calls = []

    def poisoned(pixels):
        calls.append(1)
        out = real(pixels)
        if len(calls) == 3:
            out.latent_dist.mean = out.latent_dist.mean * float("nan")
        return out

    monkeypatch.setattr(vae, "encode", poisoned)
    # Random crops of 80x64 images to 64 px: every step encodes its image.
    subject = make_subject(
        instance, train=dict(steps=4, center_crop=False, checkpoint_every=1, train_text_encoder=False)
    )
    ctx = train_context(tmp_path, subject)
    with pytest.raises(StepError, match="non-finite latents"):
        run_train(ctx)
    assert len(calls) == 3  # the poisoned encoding was step 3's
    assert sorted(p.name for p in ctx.work.glob("checkpoint-*")) == ["checkpoint-2"]


def test_shared_pipeline_is_left_as_found(tmp_path, images):
    import torch

    instance, _ = images
    pipe = model_cache().pipeline()
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    te_keys = set(pipe.text_encoder.state_dict())
    unet_cls, te_cls = type(pipe.unet), type(pipe.text_encoder)
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    run_train(
        train_context(tmp_path, make_subject(instance, train=dict(steps=2, gradient_checkpointing=True)))
    )
    assert type(pipe.unet) is unet_cls and type(pipe.text_encoder) is te_cls
    assert set(pipe.unet.state_dict()) == set(unet_before)
    assert set(pipe.text_encoder.state_dict()) == te_keys
    assert all(torch.equal(v, unet_before[k]) for k, v in pipe.unet.state_dict().items())
    assert not pipe.unet.training and not pipe.unet.is_gradient_checkpointing
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags


def test_cached_latents_and_checkpointing_do_not_change_the_result(tmp_path, images):
    from runner.adapters import lora_delta

    instance, _ = images
    fast = train_context(tmp_path, make_subject(instance, train=dict(steps=3, train_text_encoder=False)))
    slow = train_context(
        tmp_path,
        make_subject(
            instance,
            train=dict(steps=3, train_text_encoder=False, cache_latents=False, gradient_checkpointing=True),
        ),
        work=tmp_path / "slow",
    )
    logs = []
    slow.log = logs.append
    run_train(fast)
    run_train(slow)
    assert any("encoded per step for 3" in line for line in logs)
    a, b = lora_delta(fast.out, "unet"), lora_delta(slow.out, "unet")
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-5 * max(1.0, a[key].abs().max().item())


def test_v_prediction_trains_on_velocity(tmp_path, images, monkeypatch):
    from diffusers import DDPMScheduler

    instance, _ = images
    calls = []
    real = DDPMScheduler.get_velocity

    def spy(self, sample, noise, timesteps):
        calls.append(len(sample))
        return real(self, sample, noise, timesteps)

    monkeypatch.setattr(DDPMScheduler, "get_velocity", spy)
    subject = make_subject(instance, train=dict(steps=3, train_text_encoder=False))
    ctx = train_context(tmp_path, subject, base_model="tiny-sd-v")
    run_train(ctx)
    assert calls == [1, 1, 1]
    assert json.loads((ctx.out / "dbl.json").read_text())["prediction_type"] == "v_prediction"


def test_8bit_adam_without_cuda_is_a_clear_error(tmp_path, images):
    instance, _ = images
    ctx = train_context(tmp_path, make_subject(instance, train=dict(use_8bit_adam=True)))
    with pytest.raises(StepError, match="use_8bit_adam"):
        run_train(ctx)


def test_a_bad_instance_image_names_the_file(tmp_path, images):
    instance, _ = images
    folder = tmp_path / "dog"
    folder.mkdir()
    (folder / "ok.png").write_bytes((instance / "00.png").read_bytes())
    (folder / "broken.jpg").write_bytes(b"\x00not a jpeg")
    with pytest.raises(StepError, match="broken.jpg"):
        run_train(train_context(tmp_path, make_subject(folder)))


def test_two_processes_train_an_adapter_that_loads(tmp_path, images):
    """gloo on the CPU: 2 processes x batch 1 see the examples 1 process x batch 2 sees."""
    from runner.adapters import lora_delta
    from runner.models import load_pipeline
    from runner.pipeline_adapters import load_adapter_into

    instance, _ = images
    progress = []
    two = train_context(
        tmp_path,
        make_subject(instance, train=dict(steps=2, batch_size=1, train_text_encoder=False)),
        num_processes=2,
        progress=lambda done, total, **m: progress.append(done),
    )
    metrics = run_train(two)
    assert metrics["steps"] == 2 and progress[-1] == 2
    load_adapter_into(load_pipeline(model_cache().base), two.out, "dog")
    one = train_context(
        tmp_path,
        make_subject(instance, train=dict(steps=2, batch_size=2, train_text_encoder=False)),
        work=tmp_path / "one",
    )
    run_train(one)
    a, b = lora_delta(two.out, "unet"), lora_delta(one.out, "unet")
    for key in a:
        # Adam magnifies last-bit differences of the all-reduced gradients; other data would differ by 100%.
        assert (a[key] - b[key]).abs().max() <= 1e-2 * a[key].abs().max().item()


@pytest.mark.skipif(not (DREAMBENCH / "dog").is_dir(), reason="no dreambench photos")
def test_real_photos_train(tmp_path):
    subject = make_subject(DREAMBENCH / "dog", train=dict(steps=2, train_text_encoder=False))
    metrics = run_train(train_context(tmp_path, subject))
    assert metrics["steps"] == 2


def test_the_log_says_whether_gradient_checkpointing_is_on_and_it_changes_no_result(tmp_path, images):
    """Nor do checkpoints: no setting kept out of the fingerprint changes a byte of the adapter."""
    instance, _ = images
    outputs = {}
    for setting, line in [
        ("auto", "gradient checkpointing: off (auto: off on cpu)"),
        (True, "gradient checkpointing: on (set in [train])"),
    ]:
        logs = []
        every = 1 if setting is True else 0
        subject = make_subject(
            instance, train=dict(steps=2, gradient_checkpointing=setting, checkpoint_every=every)
        )
        ctx = train_context(tmp_path, subject, work=tmp_path / f"work-{setting}", log=logs.append)
        run_train(ctx)
        assert line in logs
        outputs[setting] = folder_bytes(ctx.out)
    # Recomputed activations are the same numbers; dbl.json records neither setting.
    assert outputs["auto"] == outputs[True]


def test_losses_read_back_every_few_steps_give_the_same_log(tmp_path, images, monkeypatch):
    """On an accelerator the losses stay on the device and are read back every few steps; the per-step log,
    the adapter and the progress (one call a step, the loss at each read-back) are what reading every step
    gives."""
    from runner.training import loop

    instance, _ = images
    outputs, calls = {}, {}
    for every in (1, 3):
        monkeypatch.setattr(loop, "readback_interval", lambda device, every=every: every)
        progress = calls[every] = []
        subject = make_subject(instance, train=dict(steps=5, train_text_encoder=False))
        ctx = train_context(
            tmp_path,
            subject,
            work=tmp_path / f"work-{every}",
            progress=lambda done, total, seen=progress, **m: seen.append((done, "loss" in m)),
        )
        run_train(ctx)
        outputs[every] = folder_bytes(ctx.out)
    assert outputs[3] == outputs[1]
    assert calls[1][1:] == [(step, True) for step in range(1, 6)]
    assert calls[3][1:] == [(1, False), (2, False), (3, True), (4, False), (5, True)]


class _Placed:
    """A stand-in VAE: one parameter, and every device it is moved to."""

    def __init__(self):
        import torch

        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.moves = []

    def parameters(self):
        return iter([self.weight])

    def to(self, device):
        self.moves.append(str(device))
        return self


@pytest.mark.parametrize(
    "device, uncached, parks", [("cuda", 0, True), ("cuda:1", 0, True), ("cuda", 2, False), ("cpu", 0, False)]
)
def test_the_vae_waits_in_host_memory_while_a_gpu_trains_on_cached_latents(device, uncached, parks):
    """No step uses the VAE when every latent is cached: on a CUDA device it leaves the GPU for the run
    (and comes back to where it was after); images encoded at each step keep it there, and so does a CPU."""
    from types import SimpleNamespace

    from runner.training import loop

    vae = _Placed()
    run = SimpleNamespace(
        device=device,
        pipe=SimpleNamespace(vae=vae),
        latents=SimpleNamespace(uncached_images=uncached),
        vae_home=None,
    )
    loop._park_vae(run)
    assert vae.moves == (["cpu"] if parks else [])
    assert (run.vae_home is not None) == parks
    loop._unpark_vae(run)
    assert vae.moves == (["cpu", "cpu"] if parks else [])  # back where it was (the CPU, in this test)
    assert run.vae_home is None
    loop._unpark_vae(run)  # a second call moves nothing
    assert len(vae.moves) == (2 if parks else 0)
