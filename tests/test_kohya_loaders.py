"""dbl's kohya files as ComfyUI and A1111 read them: every key lands on the weight it trained, at the
strength it trained, in a checkpoint of the original layout (SD 1.x, SD 2.x with OpenCLIP, SDXL).

The loaders are re-implemented in tests/kohya_loaders.py from their own code; tests/single_file.py writes
the tiny models in the original layouts, and the first test checks that diffusers reads those back as
the same models, so that the layouts are right.
"""

from __future__ import annotations

import pytest

from runner.steps import KOHYA_STEM
from tests.kohya_loaders import (
    a1111_deltas,
    a1111_layers,
    a1111_match,
    comfyui_deltas,
    comfyui_unet_config,
    lora_modules,
)
from tests.steps_fixtures import draw_images, make_subject, model_cache, train_context

pytestmark = pytest.mark.torch

# (built-in model, the original layout of its kind): tiny-sd-v stands for SD 2.x, whose single files
# hold an OpenCLIP text encoder (one fused attention projection per layer).
MODELS = [("tiny-sd", "sd1"), ("tiny-sd-v", "sd2"), ("tiny-sdxl", "sdxl")]
# A default project's [lora] (the recipe's ranks and alphas, default targets); a short, strong training
# so that every LoRA changes its weights well above rounding.
DEFAULT_LORA = dict(rank=16, alpha=27, text_encoder_rank=16, text_encoder_alpha=17)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    images = draw_images(tmp_path_factory.mktemp("images") / "dog", 2, size=(64, 64))
    out = {}
    for base, _ in MODELS:
        subject = make_subject(images, train=dict(steps=2, learning_rate=2e-2), lora=DEFAULT_LORA)
        ctx = train_context(tmp_path_factory.mktemp(base), subject, base_model=base)
        from runner.steps import train

        train.run(ctx)
        out[base] = ctx.out
    return out


def _original(pipe, layout):
    from tests.single_file import original_state_dict

    return original_state_dict(pipe, layout)


def _merged_deltas(base_model: str, folder, layout: str) -> tuple[dict, dict]:
    """The checkpoint of the base model, and what merging the adapter (PEFT layout) changes in it."""
    from runner import families
    from runner.models import load_pipeline
    from runner.pipeline_adapters import load_adapter_into, set_active

    base = model_cache(base_model).base
    original = _original(load_pipeline(base), layout)
    pipe = load_pipeline(base)
    load_adapter_into(pipe, folder, "dog")
    set_active(pipe, "dog")
    for c in families.of(pipe).components:
        setattr(pipe, c.attr, getattr(pipe, c.attr).merge_and_unload())
    merged = _original(pipe, layout)
    changed = {k: merged[k] - original[k] for k in original if not (merged[k] == original[k]).all()}
    return original, changed


@pytest.mark.parametrize("base_model, layout", [m for m in MODELS if m[1] != "sdxl"])
def test_the_original_layouts_read_back_as_the_same_models(tmp_path, base_model, layout):
    """tests/single_file.py's SD 1.x and 2.x layouts, through diffusers' own converters (SDXL's: test_sdxl)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from runner.models import load_pipeline, model_folder
    from tests.single_file import save_single_file

    base = model_cache(base_model).base
    pipe = load_pipeline(base)
    path = tmp_path / "model.safetensors"
    save_single_file(pipe, path, layout)
    single = StableDiffusionPipeline.from_single_file(
        str(path), config=model_folder(base), torch_dtype=torch.float32, safety_checker=None
    )
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(pipe, name).state_dict(), getattr(single, name).state_dict()
        assert set(want) == set(got), name
        assert all(torch.equal(want[k], got[k]) for k in want), name


def _kohya(path):
    from runner.adapters import read_safetensors

    if path.is_dir():  # a train step's outputs
        path = path / f"{KOHYA_STEM}.safetensors"
    return read_safetensors(path)[0]


@pytest.mark.parametrize("base_model, layout", MODELS)
def test_every_alpha_sits_beside_its_pair_at_the_trained_strength(trained, base_model, layout):
    from runner import families
    from runner.adapters import lora_delta, module_scaling, read_adapter_config

    folder = trained[base_model]
    family = families.detect(model_cache(base_model).base)
    modules = lora_modules(_kohya(folder))
    assert modules and all(set(w) == {"down", "up", "alpha"} for w in modules.values())
    trained_here = {}
    for component, config in read_adapter_config(folder).items():
        for module in lora_delta(folder, component):
            trained_here[family.kohya_name(component, module)] = module_scaling(config, module)
    assert set(trained_here) <= set(modules)
    assert {n.split("_", 2)[1] for n in trained_here} == (
        {"unet", "te1", "te2"} if layout == "sdxl" else {"unet", "te"}
    )
    for name, weights in modules.items():
        if name in trained_here:
            strength = float(weights["alpha"]) / weights["down"].shape[0]
            assert strength == pytest.approx(trained_here[name], rel=1e-6), name
        else:  # an attention block's completion: changes nothing
            assert not weights["up"].any(), name


@pytest.mark.parametrize("loader", ["comfyui", "a1111"])
@pytest.mark.parametrize("base_model, layout", MODELS)
def test_every_kohya_key_lands_on_the_weight_it_trained(trained, base_model, layout, loader):
    """Each loader's change to the checkpoint equals merging the PEFT adapter: every key maps to an existing
    weight of its shape, none is left over, and the scale is alpha / rank as trained."""
    import torch

    folder = trained[base_model]
    original, want = _merged_deltas(base_model, folder, layout)
    unet = model_cache(base_model).pipeline().unet
    lora = _kohya(folder)
    if loader == "comfyui":
        got, unused = comfyui_deltas(lora, original, layout, comfyui_unet_config(dict(unet.config)))
    else:
        # A1111's block arithmetic assumes the 2 residual blocks per level of real models; the tiny ones
        # have 1 (the next test checks the real arithmetic on a real block layout).
        got, unused = a1111_deltas(lora, original, layout, unet.config.layers_per_block + 1)
    assert unused == []
    assert want and any(".transformer_blocks." in k for k in want)
    assert any(k.startswith(("cond_stage_model.", "conditioner.embedders.0.")) for k in want)
    if layout == "sdxl":
        assert any(k.startswith("conditioner.embedders.1.") for k in want)
    changed = {k for k, d in got.items() if d.abs().max() > 0}
    assert changed == set(want)
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("base_model, layout", [("tiny-sd", "sd1"), ("tiny-sdxl", "sdxl")])
def test_a1111_block_arithmetic_finds_the_unet_modules_of_a_real_block_layout(tmp_path, base_model, layout):
    """A UNet with 2 residual blocks per level, as every SD 1.x, 2.x and SDXL UNet has: the kohya file dbl
    writes for a LoRA on it maps with A1111's own constant, to the weights the LoRA changes."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model

    from runner import families
    from runner.adapters import save_adapter
    from runner.project.schema import LoraSettings
    from tests.single_file import _unet_to_original

    family = families.detect(model_cache(base_model).base)
    config = {**model_cache(base_model).pipeline().unet.config, "layers_per_block": 2}
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    base = {k: v.clone() for k, v in _unet_to_original(unet).items()}  # merging changes the weights in place
    targets = LoraSettings().target_modules
    lora_config = LoraConfig(r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(unet, lora_config)
    save_adapter(tmp_path / "a", {"unet": model}, base_model=base_model, name="a", family=family)
    merged = _unet_to_original(model.merge_and_unload())
    want = {k: merged[k] - base[k] for k in base if not torch.equal(merged[k], base[k])}
    lora = _kohya(tmp_path / "a" / "a.safetensors")
    matched, failed = a1111_match(lora, a1111_layers(base, layout))
    assert failed == [] and matched
    got, unused = a1111_deltas(lora, base, layout)
    assert unused == [] and set(got) == set(want)
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta, rtol=1e-4, atol=1e-6, msg=key)
    comfy, unused = comfyui_deltas(lora, base, layout, comfyui_unet_config(dict(unet.config)))
    assert unused == [] and set(comfy) == set(want)


def test_sdxl_added_conditioning_lora_loads_in_diffusers_comfyui_and_a1111(tmp_path):
    """SDXL's added-conditioning MLP (add_embedding, targeted by "linear_1" and "linear_2" with the time
    embedding) goes into the kohya file under its original name, label_emb: diffusers' kohya reader
    mangled `lora_unet_add_embedding_linear_1` and dropped it without a word, and A1111 found no such
    layer."""
    import torch
    from peft import LoraConfig, get_peft_model

    from runner import families
    from runner.adapters import save_adapter
    from runner.models import load_pipeline
    from tests.single_file import _unet_to_original

    base_model = model_cache("tiny-sdxl").base
    family = families.detect(base_model)
    unet = load_pipeline(base_model).unet
    torch.manual_seed(0)
    base = {k: v.clone() for k, v in _unet_to_original(unet).items()}
    config = LoraConfig(r=2, lora_alpha=3, target_modules=["linear_1", "linear_2"], init_lora_weights=False)
    model = get_peft_model(unet, config)
    save_adapter(tmp_path / "a", {"unet": model}, base_model="tiny-sdxl", name="a", family=family)
    merged = model.merge_and_unload()
    want = {k: v - base[k] for k, v in _unet_to_original(merged).items() if not torch.equal(v, base[k])}
    assert {k.split(".")[2] for k in want} == {"label_emb", "time_embed"}

    lora = _kohya(tmp_path / "a" / "a.safetensors")
    got, unused = comfyui_deltas(lora, base, "sdxl", comfyui_unet_config(dict(unet.config)))
    assert unused == [] and set(got) == set(want)
    got, unused = a1111_deltas(lora, base, "sdxl", unet.config.layers_per_block + 1)
    assert unused == [] and set(got) == set(want)
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta, rtol=1e-4, atol=1e-6, msg=key)

    pipe = load_pipeline(base_model)
    pipe.load_lora_weights(str(tmp_path / "a"), weight_name="a.safetensors")
    pipe.fuse_lora()
    for name in ("add_embedding.linear_1", "add_embedding.linear_2", "time_embedding.linear_1"):
        fused = pipe.unet.get_submodule(name).get_base_layer().weight
        torch.testing.assert_close(fused, merged.get_submodule(name).weight, rtol=0, atol=1e-5, msg=name)
    assert "lora_unet_label_emb_0_0.lora_down.weight" in lora


def test_sdxl_text_projection_lora_loads_in_diffusers_and_comfyui(tmp_path):
    """A LoRA on the second text encoder's text_projection, which sits beside its text_model level: the
    kohya file names it `lora_te2_text_projection`, as ComfyUI and diffusers map it (under text_model_
    diffusers dropped it, or failed to read the file). A1111 takes no LoRA there (a plain parameter in its
    model): it leaves that key alone, and the rest of the file loads."""
    import torch
    from peft import LoraConfig, get_peft_model

    from runner import families
    from runner.adapters import save_adapter
    from runner.models import load_pipeline
    from tests.single_file import original_state_dict

    base_model = model_cache("tiny-sdxl").base
    family = families.detect(base_model)
    pipe = load_pipeline(base_model)
    base = {k: v.clone() for k, v in original_state_dict(pipe, "sdxl").items()}
    torch.manual_seed(0)
    unet = get_peft_model(
        pipe.unet, LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False)
    )
    te2 = get_peft_model(
        pipe.text_encoder_2,
        LoraConfig(r=2, lora_alpha=3, target_modules=["text_projection", "q_proj"], init_lora_weights=False),
    )
    save_adapter(
        tmp_path / "a", {"unet": unet, "text_encoder_2": te2}, base_model="tiny-sdxl", name="a", family=family
    )
    pipe.unet, pipe.text_encoder_2 = unet.merge_and_unload(), te2.merge_and_unload()
    merged = original_state_dict(pipe, "sdxl")
    want = {k: v - base[k] for k, v in merged.items() if not torch.equal(v, base[k])}
    assert "conditioner.embedders.1.model.text_projection" in want

    lora = _kohya(tmp_path / "a" / "a.safetensors")
    assert "lora_te2_text_projection.lora_down.weight" in lora
    assert not any("text_model_text_projection" in k for k in lora)
    got, unused = comfyui_deltas(lora, base, "sdxl", comfyui_unet_config(dict(pipe.unet.config)))
    assert unused == [] and {k for k, d in got.items() if d.abs().max() > 0} == set(want)
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta, rtol=1e-4, atol=1e-6, msg=key)
    got, unused = a1111_deltas(lora, base, "sdxl", pipe.unet.config.layers_per_block + 1)
    assert {k.split(".")[0] for k in unused} == {"lora_te2_text_projection"}
    changed = {k for k, d in got.items() if d.abs().max() > 0}
    assert changed == set(want) - {"conditioner.embedders.1.model.text_projection"}

    fresh = load_pipeline(base_model)
    fresh.load_lora_weights(str(tmp_path / "a"), weight_name="a.safetensors")
    fresh.fuse_lora()
    fused = fresh.text_encoder_2.get_submodule("text_projection")
    fused = getattr(fused, "base_layer", fused).weight
    torch.testing.assert_close(fused, pipe.text_encoder_2.text_projection.weight, rtol=0, atol=1e-5)


def test_sdxl_text_projection_lora_loads_back_into_dbl(tmp_path):
    """dbl's own loader (renders, blends, runner.api) puts a text_projection LoRA where it was trained, not
    under a text_model level the module is beside."""
    import torch
    from peft import LoraConfig, get_peft_model

    from runner import families
    from runner.adapters import save_adapter
    from runner.models import load_pipeline
    from runner.pipeline_adapters import load_adapter_into, set_active

    base_model = model_cache("tiny-sdxl").base
    pipe = load_pipeline(base_model)
    torch.manual_seed(0)
    unet = get_peft_model(
        pipe.unet, LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], init_lora_weights=False)
    )
    te2 = get_peft_model(
        pipe.text_encoder_2,
        LoraConfig(r=2, lora_alpha=3, target_modules=["text_projection"], init_lora_weights=False),
    )
    family = families.detect(base_model)
    save_adapter(
        tmp_path / "a", {"unet": unet, "text_encoder_2": te2}, base_model="tiny-sdxl", name="a", family=family
    )
    want = te2.merge_and_unload().text_projection.weight

    fresh = load_pipeline(base_model)
    load_adapter_into(fresh, tmp_path / "a", "a")
    set_active(fresh, "a")
    merged = fresh.text_encoder_2.merge_and_unload()
    torch.testing.assert_close(merged.text_projection.weight, want, rtol=0, atol=1e-6)
