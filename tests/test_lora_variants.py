"""DoRA, rsLoRA and target presets on tiny-sd: every output format gives the trained denoiser and text
encoder, or the README says why not; blends refuse DoRA adapters."""

from __future__ import annotations

import pytest

from runner.adapters import AdapterError
from tests.adapter_outputs import denoiser_outputs, tiny_sd_pipeline
from tests.steps_fixtures import (
    DORA_KOHYA_NOTE,
    FAST_LORA,
    draw_images,
    make_subject,
    model_cache,
    train_context,
)

pytestmark = pytest.mark.torch


def _variant(pipe, seed=0, **lora):
    """dbl's own LoRA setup (runner.training.lora.add_lora) from [lora] keys, with non-zero B matrices
    and DoRA magnitudes moved away from their initial weight norms, as training would leave them."""
    import torch

    from runner import families
    from runner.project.schema import LoraSettings
    from runner.training.lora import add_lora

    family = families.get("sd1")
    modules = add_lora(pipe, family, family.components, LoraSettings(**{**FAST_LORA, **lora}), seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules.values():
            for name, param in module.named_parameters():
                if "lora_B" in name:
                    param.copy_(0.3 * torch.randn(param.shape, generator=g))
                elif "lora_magnitude_vector" in name:
                    param.mul_(1 + 0.3 * torch.randn(param.shape, generator=g))
    return {name: module.eval() for name, module in modules.items()}


def _assert_same(got, expected, what):
    import torch

    for a, b, part in zip(got, expected, ("unet", "text encoder"), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=f"{what}: {part}")


def _comfyui_apply(pipe, path, family_name="sd1"):
    """Apply a kohya file the way ComfyUI and Forge do: W + alpha / rank * up @ down, and with a
    `dora_scale` shaped (out, 1) that times dora_scale / (||W|| + eps) per output row."""
    import torch

    from runner import families
    from runner.adapters import read_safetensors

    family = families.get(family_name)
    tensors, _ = read_safetensors(path)
    modules = {}
    for c in family.components:
        for name, module in getattr(pipe, c.attr).named_modules():
            if name:
                modules[family.kohya_name(c.name, name)] = module
    names = {key.split(".")[0] for key in tensors}
    with torch.no_grad():
        for name in names:
            weight = modules[name].weight
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
            alpha = float(tensors[f"{name}.alpha"]) / down.shape[0]
            merged = weight + alpha * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
            scale = tensors.get(f"{name}.dora_scale")
            if scale is not None:
                assert scale.shape == (weight.shape[0], 1)
                rows = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
                merged = merged * scale / (rows + torch.finfo(weight.dtype).eps)
            weight.copy_(merged)
    return pipe


@pytest.fixture(scope="module")
def dora(tmp_path_factory):
    """A DoRA adapter (with rsLoRA on the UNet) on the UNet's and the text encoder's attention."""
    from runner.adapters import save_adapter

    folder = tmp_path_factory.mktemp("dora") / "dog"
    lora = dict(
        use_dora=True,
        use_rslora=True,
        text_encoder_use_dora=True,
        target_modules="attention",
        text_encoder_target_modules=["q_proj", "v_proj"],
    )
    modules = _variant(tiny_sd_pipeline(), **lora)
    expected = denoiser_outputs(modules["unet"], modules["text_encoder"])
    with pytest.warns(UserWarning, match=DORA_KOHYA_NOTE):
        save_adapter(folder, modules, base_model="tiny-sd")
    return folder, expected


def test_dora_loads_through_peft_and_dbl(dora):
    from peft import PeftModel

    from runner.pipeline_adapters import load_adapter_into

    folder, expected = dora
    pipe = tiny_sd_pipeline()
    unet = PeftModel.from_pretrained(pipe.unet, folder / "unet")
    te = PeftModel.from_pretrained(pipe.text_encoder, folder / "text_encoder")
    assert unet.peft_config["default"].use_dora and unet.peft_config["default"].use_rslora
    _assert_same(denoiser_outputs(unet, te), expected, "PeftModel.from_pretrained")
    pipe = tiny_sd_pipeline()
    load_adapter_into(pipe, folder, "dog")
    _assert_same(denoiser_outputs(pipe.unet, pipe.text_encoder), expected, "load_adapter_into")


def test_dora_loads_through_the_diffusers_file(dora):
    from runner.adapters import DIFFUSERS_WEIGHTS, read_safetensors

    folder, expected = dora
    tensors, _ = read_safetensors(folder / DIFFUSERS_WEIGHTS)
    assert any(k.startswith("unet.") and k.endswith(".lora_magnitude_vector") for k in tensors)
    assert any(k.startswith("text_encoder.") and k.endswith(".lora_magnitude_vector.weight") for k in tensors)
    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(str(folder), weight_name=DIFFUSERS_WEIGHTS, adapter_name="dog")
    _assert_same(denoiser_outputs(pipe.unet, pipe.text_encoder), expected, "load_lora_weights")


def test_dora_kohya_file_gives_the_trained_weights_in_comfyui(dora):
    import torch

    from runner.adapters import read_safetensors

    folder, expected = dora
    tensors, meta = read_safetensors(folder / "dog.safetensors")
    scales = [k for k in tensors if k.endswith(".dora_scale")]
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k.dora_scale" in scales
    assert any(k.startswith("lora_te_") for k in scales)
    # Every module with a LoRA has one, but not the zero-valued entries that complete an attention block.
    assert "lora_te_text_model_encoder_layers_0_self_attn_k_proj.lora_up.weight" in tensors
    assert "lora_te_text_model_encoder_layers_0_self_attn_k_proj.dora_scale" not in tensors
    # rsLoRA: kohya scales by alpha / rank, so alpha is written as alpha * sqrt(rank) (8 * sqrt(4) = 16).
    assert float(tensors["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k.alpha"]) == 16.0
    assert meta["ss_network_alpha"] == "16"
    pipe = _comfyui_apply(tiny_sd_pipeline(), folder / "dog.safetensors")
    _assert_same(denoiser_outputs(pipe.unet, pipe.text_encoder), expected, "ComfyUI's weight decomposition")
    # diffusers 0.42 drops dora_scale keys from kohya files (with a warning), so it loads only the low-rank
    # part there; the README sends diffusers users to pytorch_lora_weights.safetensors.
    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(str(folder), weight_name="dog.safetensors", adapter_name="dog")
    got = denoiser_outputs(pipe.unet, pipe.text_encoder)
    assert not torch.allclose(got[0], expected[0], atol=1e-4), (
        "diffusers reads dora_scale now: update the README"
    )


def test_rslora_on_all_linear_layers_loads_in_every_format(tmp_path):
    from peft import PeftModel

    from runner.adapters import DIFFUSERS_WEIGHTS, read_adapter_config, save_adapter

    lora = dict(
        use_rslora=True,
        text_encoder_use_rslora=True,
        target_modules="all-linear",
        text_encoder_target_modules="all-linear",
    )
    modules = _variant(tiny_sd_pipeline(), **lora)
    expected = denoiser_outputs(modules["unet"], modules["text_encoder"])
    save_adapter(tmp_path / "dog", modules, base_model="tiny-sd")
    configs = read_adapter_config(tmp_path / "dog")
    # tiny-sd's proj_in and proj_out are 1x1 convolutions (SD 1.x): all-linear leaves them out.
    assert sorted(configs["unet"]["target_modules"]) == sorted(
        ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
    )
    assert sorted(configs["text_encoder"]["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    )
    assert configs["unet"]["use_rslora"] and configs["text_encoder"]["use_rslora"]
    pipe = tiny_sd_pipeline()
    unet = PeftModel.from_pretrained(pipe.unet, tmp_path / "dog" / "unet")
    te = PeftModel.from_pretrained(pipe.text_encoder, tmp_path / "dog" / "text_encoder")
    _assert_same(denoiser_outputs(unet, te), expected, "PEFT")
    for weight_name in (DIFFUSERS_WEIGHTS, "dog.safetensors"):
        pipe = tiny_sd_pipeline()
        pipe.load_lora_weights(str(tmp_path / "dog"), weight_name=weight_name, adapter_name="dog")
        _assert_same(denoiser_outputs(pipe.unet, pipe.text_encoder), expected, weight_name)
    pipe = _comfyui_apply(tiny_sd_pipeline(), tmp_path / "dog" / "dog.safetensors")
    _assert_same(denoiser_outputs(pipe.unet, pipe.text_encoder), expected, "kohya, applied by hand")


def test_all_linear_takes_proj_in_and_out_where_they_are_linear():
    import torch

    from runner.families import sd1
    from runner.training.lora import target_modules

    def model(proj):
        block = torch.nn.Module()
        block.proj_in, block.proj_out = proj(), proj()
        block.ff = torch.nn.Module()
        block.ff.net = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Dropout(), torch.nn.Linear(4, 4)])
        block.ff.net[0].proj = torch.nn.Linear(4, 8)
        root = torch.nn.Module()
        root.block = block
        return root

    linear = target_modules(sd1.UNET, "all-linear", model(lambda: torch.nn.Linear(4, 4)))
    conv = target_modules(sd1.UNET, "all-linear", model(lambda: torch.nn.Conv2d(4, 4, 1)))
    assert linear == ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
    assert conv == ["ff.net.0.proj", "ff.net.2"]
    assert target_modules(sd1.UNET, "qv", None) == ["to_q", "to_v", "query", "value"]
    assert target_modules(sd1.TEXT_ENCODER, "attention", None) == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert target_modules(sd1.UNET, ["to_k"], None) == ["to_k"]


def test_blending_dora_adapters_is_refused(dora, tmp_path):
    from runner import blending

    folder, _ = dora
    pipe = tiny_sd_pipeline()
    blending.load(pipe, folder, "dog")
    blending.load(pipe, folder, "dog2")
    with pytest.raises(AdapterError, match="dog, dog2: DoRA adapters cannot be blended"):
        blending.blend(pipe, {"dog": 1.0, "dog2": 0.5}, "mix")
    assert blending.loaded_adapters(pipe) == ["dog", "dog2"]


def test_blending_adapters_with_trained_biases_is_refused(tmp_path):
    """PEFT keeps trained biases in the base model: a blend after a plain adapter lost them (with a
    relative error of 0), and one after them failed in PEFT's words."""
    import warnings

    from runner import blending
    from runner.adapters import save_adapter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # biases are kept in the PEFT layout only
        save_adapter(tmp_path / "dog", _variant(tiny_sd_pipeline(), bias="all"), base_model="tiny-sd")
        save_adapter(tmp_path / "toy", _variant(tiny_sd_pipeline(), seed=1), base_model="tiny-sd")
    pipe = tiny_sd_pipeline()
    blending.load(pipe, tmp_path / "toy", "toy")
    blending.load(pipe, tmp_path / "dog", "dog")
    for order in (["toy", "dog"], ["dog", "toy"]):
        with pytest.raises(
            AdapterError, match=r"dog \(unet bias = 'all'\): adapters trained with biases cannot"
        ):
            blending.blend(pipe, dict.fromkeys(order, 0.5), "mix")
    assert blending.loaded_adapters(pipe) == ["toy", "dog"]


def test_a_dora_subject_trains_its_magnitudes_and_loads(tmp_path):
    import torch

    from runner.adapters import read_adapter_weights, read_safetensors
    from runner.pipeline_adapters import load_adapter_into

    images = draw_images(tmp_path / "dog", 2)
    lora = dict(use_dora=True, text_encoder_use_dora=True, use_rslora=True, target_modules="attention")
    ctx = train_context(tmp_path, make_subject(images, train=dict(steps=2), lora=lora))
    from runner.steps import train

    with pytest.warns(UserWarning, match=DORA_KOHYA_NOTE):
        train.run(ctx)
    state = read_adapter_weights(ctx.out, "unet")
    magnitudes = {k: v for k, v in state.items() if k.endswith(".lora_magnitude_vector")}
    assert magnitudes and len(magnitudes) == sum(k.endswith(".lora_A.weight") for k in state)
    # Trained: the magnitudes moved away from the base weights' row norms they start at.
    pipe = tiny_sd_pipeline()
    unet = pipe.unet
    moved = 0.0
    for key, value in magnitudes.items():
        weight = unet.get_submodule(key.removesuffix(".lora_magnitude_vector")).weight.detach()
        moved = max(moved, float((value - weight.norm(dim=1)).abs().max()))
    assert moved > 1e-4
    kohya, _ = read_safetensors(ctx.out / "kohya.safetensors")
    assert sum(k.endswith(".dora_scale") for k in kohya) == len(magnitudes) + sum(
        k.endswith(".lora_magnitude_vector") for k in read_adapter_weights(ctx.out, "text_encoder")
    )
    load_adapter_into(pipe, ctx.out, "dog")
    assert pipe.unet.peft_config["dog"].use_dora
    assert torch.isfinite(denoiser_outputs(pipe.unet, pipe.text_encoder)[0]).all()


def test_sdxl_dora_on_every_component_in_every_format(tmp_path):
    """tiny-sdxl: DoRA and rsLoRA on the UNet and both text encoders (the second one's keys falling back
    to the first's), on all linear layers, proj_in and proj_out included (they are linear in SDXL)."""
    import torch
    from peft import PeftModel

    from runner.adapters import DIFFUSERS_WEIGHTS, read_adapter_config
    from runner.models import load_pipeline

    def outputs(pipe):
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(1, 4, 32, 32, generator=g), torch.tensor([500])
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(
                "sks dog", device="cpu", do_classifier_free_guidance=False
            )
            time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
            kwargs = {"text_embeds": pooled, "time_ids": time_ids}
            return pipe.unet(x, t, embeds, added_cond_kwargs=kwargs).sample, embeds, pooled

    images = draw_images(tmp_path / "dog", 2, size=(64, 64))
    lora = dict(
        use_dora=True,
        use_rslora=True,
        text_encoder_use_dora=True,
        text_encoder_use_rslora=True,
        target_modules="all-linear",
        text_encoder_target_modules="attention",
    )
    train = dict(steps=2, learning_rate=1e-2)
    ctx = train_context(tmp_path, make_subject(images, train=train, lora=lora), base_model="tiny-sdxl")
    from runner.steps import train as train_step

    with pytest.warns(UserWarning, match=DORA_KOHYA_NOTE):
        train_step.run(ctx)
    configs = read_adapter_config(ctx.out)
    assert "proj_in" in configs["unet"]["target_modules"] and "ff.net.2" in configs["unet"]["target_modules"]
    assert all(c["use_dora"] and c["use_rslora"] for c in configs.values()) and len(configs) == 3

    base = model_cache("tiny-sdxl").base
    pipe = load_pipeline(base)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        setattr(pipe, name, PeftModel.from_pretrained(getattr(pipe, name), ctx.out / name))
    expected = outputs(pipe)
    plain = outputs(load_pipeline(base))
    for a, b in zip(expected, plain, strict=True):
        assert not torch.allclose(a, b, atol=1e-5)  # every component's adapter does something

    def same(got, what):
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4, msg=what)

    pipe = load_pipeline(base)
    pipe.load_lora_weights(str(ctx.out), weight_name=DIFFUSERS_WEIGHTS, adapter_name="dog")
    same(outputs(pipe), "diffusers file")
    same(outputs(_comfyui_apply(load_pipeline(base), ctx.out / "kohya.safetensors", "sdxl")), "kohya file")


def test_saving_a_dora_adapter_warns_that_a1111_scrambles_its_kohya_file(tmp_path):
    """A1111 (extensions-builtin/Lora/network.py apply_weight_decompose) divides W + delta by its column
    norms, shaped (1, in), and multiplies by dora_scale: with the (out, 1) scale of this file torch
    broadcasts both into a full matrix, so it loads without an error and with the wrong weights."""
    import warnings

    import torch

    from runner import families
    from runner.adapters import read_safetensors, save_adapter

    modules = _variant(tiny_sd_pipeline(), use_dora=True, text_encoder_use_dora=True)
    # it named the file "(<name>.safetensors)", a placeholder the user's folder holds no file of
    with pytest.warns(UserWarning, match=r"DoRA: the adapter's kohya file holds .* not A1111"):
        save_adapter(tmp_path / "dog", modules, base_model="tiny-sd")
    plain = _variant(tiny_sd_pipeline())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a plain LoRA is fine in A1111: no warning
        save_adapter(tmp_path / "toy", plain, base_model="tiny-sd")

    tensors, _ = read_safetensors(tmp_path / "dog" / "dog.safetensors")
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    path = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    assert families.get("sd1").kohya_name("unet", path) == name
    layer = modules["unet"].base_model.model.get_submodule(path)
    weight = layer.get_base_layer().weight.detach()
    trained = layer.get_delta_weight("default").detach() + weight  # PEFT's DoRA merge, as rendered
    down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
    merged = weight + up @ down * float(tensors[f"{name}.alpha"]) / down.shape[0]
    columns = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True).transpose(0, 1)
    a1111 = merged * (tensors[f"{name}.dora_scale"] / columns)
    assert a1111.shape == weight.shape and not torch.allclose(a1111, trained, atol=1e-2)
