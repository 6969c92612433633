"""Adapter folders: the three layouts agree, bytes are deterministic, loading never silently does nothing."""

from __future__ import annotations

import json
import struct

import pytest

from runner.adapters import AdapterError
from tests.adapter_outputs import denoiser_outputs, tiny_sd_pipeline

pytestmark = pytest.mark.torch


def _random_lora(pipe, *, unet_config=None, te_config=None, seed=0, adapter_name="default"):
    """Wrap the pipeline's UNet and text encoder with LoRA adapters whose B matrices are non-zero."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    unet_config = unet_config or dict(r=4, lora_alpha=6, target_modules=["to_q", "to_v"])
    te_config = te_config or dict(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"])
    unet = get_peft_model(pipe.unet, LoraConfig(**unet_config), adapter_name=adapter_name)
    te = get_peft_model(pipe.text_encoder, LoraConfig(**te_config), adapter_name=adapter_name)
    for model in (unet, te):
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.3)
    return unet, te


def test_safetensors_writer_is_deterministic_and_readable(tmp_path):
    import torch

    from runner.adapters import read_safetensors, write_safetensors

    tensors = {
        "b": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a": torch.tensor(2.5),
        "c": torch.ones(3, dtype=torch.float16),
    }
    meta = {"z": "1", "a": "2", "m": json.dumps({"k": [1, 2]})}
    write_safetensors(tmp_path / "one.safetensors", tensors, meta)
    write_safetensors(
        tmp_path / "two.safetensors",
        dict(reversed(list(tensors.items()))),
        dict(reversed(list(meta.items()))),
    )
    one, two = (tmp_path / "one.safetensors").read_bytes(), (tmp_path / "two.safetensors").read_bytes()
    assert one == two
    assert struct.unpack("<Q", one[:8])[0] % 8 == 0
    back, back_meta = read_safetensors(tmp_path / "one.safetensors")
    assert back_meta == meta
    for key, value in tensors.items():
        assert torch.equal(back[key], value) and back[key].dtype == value.dtype


def test_layouts_and_configs(tmp_path):
    from runner.adapters import read_adapter_config, read_safetensors, save_adapter

    pipe = tiny_sd_pipeline()
    unet, te = _random_lora(pipe)
    save_adapter(
        tmp_path / "dog", {"unet": unet, "text_encoder": te}, base_model="tiny-sd", info={"b": 1, "a": [1, 2]}
    )
    folder = tmp_path / "dog"
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert names == [
        "dbl.json",
        "dog.safetensors",
        "pytorch_lora_weights.safetensors",
        "text_encoder/adapter_config.json",
        "text_encoder/adapter_model.safetensors",
        "unet/adapter_config.json",
        "unet/adapter_model.safetensors",
    ]
    configs = read_adapter_config(folder)
    assert configs["unet"]["base_model_name_or_path"] == "tiny-sd"
    assert configs["text_encoder"]["base_model_name_or_path"] == "tiny-sd"
    assert (configs["unet"]["r"], configs["unet"]["lora_alpha"]) == (4, 6)
    assert (folder / "dbl.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'

    peft_keys, _ = read_safetensors(folder / "unet" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") and ".lora_" in k for k in peft_keys)
    diffusers_keys, meta = read_safetensors(folder / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in diffusers_keys} == {"unet", "text_encoder"}
    adapter_meta = json.loads(meta["lora_adapter_metadata"])
    assert adapter_meta["unet.r"] == 4 and adapter_meta["unet.lora_alpha"] == 6
    assert adapter_meta["text_encoder.r"] == 2 and adapter_meta["text_encoder.lora_alpha"] == 5
    kohya, kmeta = read_safetensors(folder / "dog.safetensors")
    assert (kmeta["ss_network_dim"], kmeta["ss_network_alpha"], kmeta["ss_base_model_version"]) == (
        "4",
        "6",
        "sd_v1",
    )
    te_names = [k for k in kohya if k.startswith("lora_te_")]
    assert te_names and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te_names)
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert float(kohya["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha"]) == 6.0


def test_same_weights_same_bytes_and_only_the_named_adapter(tmp_path):
    from runner.adapters import read_safetensors, save_adapter

    pipe = tiny_sd_pipeline()
    unet, te = _random_lora(pipe, adapter_name="dog")
    save_adapter(
        tmp_path / "a" / "x",
        {"unet": unet, "text_encoder": te},
        adapter_name="dog",
        base_model="tiny-sd",
        info={"n": 1},
    )
    from peft import LoraConfig

    unet.add_adapter("other", LoraConfig(r=8, lora_alpha=8, target_modules=["to_k"]))
    save_adapter(
        tmp_path / "b" / "x",
        {"unet": unet, "text_encoder": te},
        adapter_name="dog",
        base_model="tiny-sd",
        info={"n": 1},
    )
    for path in sorted((tmp_path / "a" / "x").rglob("*")):
        if path.is_file():
            twin = tmp_path / "b" / "x" / path.relative_to(tmp_path / "a" / "x")
            assert path.read_bytes() == twin.read_bytes(), path.name
    keys, _ = read_safetensors(tmp_path / "b" / "x" / "unet" / "adapter_model.safetensors")
    assert not any("to_k" in k for k in keys)
    with pytest.raises(AdapterError, match="no LoRA adapter named 'missing'"):
        save_adapter(tmp_path / "c", {"unet": unet}, adapter_name="missing", base_model="tiny-sd")


def test_kohya_alphas_follow_rank_and_alpha_patterns(tmp_path):
    import torch

    from runner.adapters import kohya_name, lora_delta, read_safetensors, save_adapter

    pipe = tiny_sd_pipeline()
    unet_config = dict(
        r=4,
        lora_alpha=6,
        target_modules=["to_q", "to_v"],
        rank_pattern={"attn2.to_q": 2},
        alpha_pattern={"attn1.to_v": 1.5},
    )
    unet, te = _random_lora(
        pipe,
        unet_config=unet_config,
        te_config=dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj"]),
    )
    save_adapter(tmp_path / "p", {"unet": unet, "text_encoder": te}, base_model="tiny-sd")
    kohya, _ = read_safetensors(tmp_path / "p" / "p.safetensors")
    for component in ("unet", "text_encoder"):
        deltas = lora_delta(tmp_path / "p", component)
        assert deltas
        for module, delta in deltas.items():
            name = kohya_name(component, module)
            down, up, alpha = (
                kohya[f"{name}.lora_down.weight"],
                kohya[f"{name}.lora_up.weight"],
                kohya[f"{name}.alpha"],
            )
            torch.testing.assert_close(
                float(alpha) / down.shape[0] * (up @ down), delta, rtol=1e-5, atol=1e-6
            )
    # The live layers agree with lora_delta too (the patterns were read right).
    for name, layer in unet.named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            module = name.removeprefix("base_model.model.")
            expected = (
                layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
            )
            torch.testing.assert_close(lora_delta(tmp_path / "p", "unet")[module], expected.detach())


def test_load_adapter_into_matches_the_live_model_and_unloads(tmp_path):
    import torch

    from runner.adapters import save_adapter
    from runner.pipeline_adapters import load_adapter_into, remove_adapter, set_active, unload_adapters

    pipe = tiny_sd_pipeline()
    base_unet, base_hidden = denoiser_outputs(pipe.unet, pipe.text_encoder)
    unet, te = _random_lora(pipe)
    expected_unet, expected_hidden = denoiser_outputs(unet, te)
    save_adapter(tmp_path / "dog", {"unet": unet, "text_encoder": te}, base_model="tiny-sd")

    fresh = tiny_sd_pipeline()
    load_adapter_into(fresh, tmp_path / "dog", "dog")
    load_adapter_into(fresh, tmp_path / "dog", "dog2")
    set_active(fresh, "dog2")
    got_unet, got_hidden = denoiser_outputs(fresh.unet, fresh.text_encoder)
    torch.testing.assert_close(got_unet, expected_unet, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_hidden, expected_hidden, rtol=0, atol=1e-5)
    with pytest.raises(AdapterError, match="already has an adapter named 'dog'"):
        load_adapter_into(fresh, tmp_path / "dog", "dog")
    remove_adapter(fresh, "dog2")
    assert set(fresh.unet.peft_config) == {"dog"}
    unload_adapters(fresh)
    assert type(fresh.unet).__name__ == "UNet2DConditionModel"
    got_unet, got_hidden = denoiser_outputs(fresh.unet, fresh.text_encoder)
    assert torch.equal(got_unet, base_unet) and torch.equal(got_hidden, base_hidden)


def test_removing_an_adapter_leaves_the_others_as_they_were_and_runs(tmp_path):
    """Removing the one active adapter leaves the base model running (PEFT would activate another one,
    with a warning); removing an inactive one leaves the active ones working."""
    import warnings

    import torch

    from runner.adapters import save_adapter
    from runner.blending import activate_adapters
    from runner.pipeline_adapters import load_adapter_into, remove_adapter

    pipe = tiny_sd_pipeline()
    base = denoiser_outputs(pipe.unet, pipe.text_encoder)
    unet, te = _random_lora(pipe)
    expected = denoiser_outputs(unet, te)
    save_adapter(tmp_path / "dog", {"unet": unet, "text_encoder": te}, base_model="tiny-sd")

    fresh = tiny_sd_pipeline()
    for name in ("dog", "dog2", "toy"):
        load_adapter_into(fresh, tmp_path / "dog", name)
    activate_adapters(fresh, ["dog2", "toy"], [1.0, 0.0])
    remove_adapter(fresh, "dog")  # the wrapper's own adapter name, which PEFT kept on the deleted one
    for got, want in zip(denoiser_outputs(fresh.unet, fresh.text_encoder), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    activate_adapters(fresh, "dog2")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        remove_adapter(fresh, "dog2")
    assert not [w for w in seen if "was active" in str(w.message)], [str(w.message) for w in seen]
    assert set(fresh.unet.peft_config) == set(fresh.text_encoder.peft_config) == {"toy"}
    for got, want in zip(denoiser_outputs(fresh.unet, fresh.text_encoder), base, strict=True):
        assert torch.equal(got, want)
    activate_adapters(fresh, "toy")
    for got, want in zip(denoiser_outputs(fresh.unet, fresh.text_encoder), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_removing_an_adapter_with_trained_biases_puts_the_base_biases_back(tmp_path):
    """PEFT keeps the biases of an adapter trained with bias = "all" in the base layers; removing or
    unloading the adapter gives the base model back (a render after it must not keep its biases)."""
    import warnings

    import torch

    from runner.adapters import save_adapter
    from runner.pipeline_adapters import load_adapter_into, remove_adapter, unload_adapters

    pipe = tiny_sd_pipeline()
    base = denoiser_outputs(pipe.unet, pipe.text_encoder)
    unet_config = dict(r=4, lora_alpha=6, target_modules=["to_q", "to_v"], bias="all")
    te_config = dict(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"], bias="all")
    unet, te = _random_lora(pipe, unet_config=unet_config, te_config=te_config)
    with torch.no_grad():
        for model in (unet, te):
            for name, param in model.named_parameters():
                if name.endswith(".bias"):
                    param.add_(0.3)
    expected = denoiser_outputs(unet, te)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # biases are kept in the PEFT layout only
        save_adapter(tmp_path / "dog", {"unet": unet, "text_encoder": te}, base_model="tiny-sd")
        plain_unet, plain_te = _random_lora(tiny_sd_pipeline(), seed=1)
        save_adapter(tmp_path / "toy", {"unet": plain_unet, "text_encoder": plain_te}, base_model="tiny-sd")

    fresh = tiny_sd_pipeline()
    load_adapter_into(fresh, tmp_path / "dog", "dog")
    for got, want in zip(denoiser_outputs(fresh.unet, fresh.text_encoder), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    remove_adapter(fresh, "dog")  # the only adapter: the plain modules come back
    for got, want in zip(denoiser_outputs(fresh.unet, fresh.text_encoder), base, strict=True):
        assert torch.equal(got, want)

    load_adapter_into(fresh, tmp_path / "toy", "toy")
    load_adapter_into(fresh, tmp_path / "dog", "dog")
    remove_adapter(fresh, "dog")  # beside another adapter
    unload_adapters(fresh)
    for got, want in zip(denoiser_outputs(fresh.unet, fresh.text_encoder), base, strict=True):
        assert torch.equal(got, want)
    load_adapter_into(fresh, tmp_path / "dog", "dog")
    unload_adapters(fresh)
    for got, want in zip(denoiser_outputs(fresh.unet, fresh.text_encoder), base, strict=True):
        assert torch.equal(got, want)


def test_loading_into_the_wrong_model_raises(tmp_path):
    import torch

    from runner.adapters import read_safetensors, save_adapter, write_safetensors
    from runner.pipeline_adapters import load_adapter_into

    pipe = tiny_sd_pipeline()
    unet, te = _random_lora(pipe)
    save_adapter(tmp_path / "dog", {"unet": unet, "text_encoder": te}, base_model="tiny-sd")
    # Rename the modules as another architecture would have them: nothing would load.
    path = tmp_path / "dog" / "unet" / "adapter_model.safetensors"
    tensors, meta = read_safetensors(path)
    write_safetensors(path, {k.replace("transformer_blocks", "blocks"): v for k, v in tensors.items()}, meta)
    with pytest.raises(AdapterError, match="match no module"):
        load_adapter_into(tiny_sd_pipeline(), tmp_path / "dog", "dog")
    # A shape mismatch (a different width) is caught too.
    tensors = {
        k: (torch.zeros(v.shape[0], v.shape[1] + 1) if "lora_A" in k else v) for k, v in tensors.items()
    }
    write_safetensors(path, tensors, meta)
    with pytest.raises((AdapterError, RuntimeError)):
        load_adapter_into(tiny_sd_pipeline(), tmp_path / "dog", "dog")


def test_a_peft_folder_of_another_method_is_named_as_such(tmp_path):
    """A PEFT LoHa folder (a LyCORIS method) was read as a LoRA, and reported as made for another model."""
    from peft import LoHaConfig, get_peft_model

    from runner.pipeline_adapters import load_adapter_into

    get_peft_model(
        tiny_sd_pipeline().unet, LoHaConfig(r=2, alpha=2, target_modules=["to_q"])
    ).save_pretrained(tmp_path / "loha" / "unet")
    pipe = tiny_sd_pipeline()
    with pytest.raises(AdapterError, match="a LOHA adapter, not a LoRA; dbl loads LoRA adapters only"):
        load_adapter_into(pipe, tmp_path / "loha", "loha")
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"


def test_transformers4_text_encoder_keys_are_translated(tmp_path):
    import torch

    from runner.adapters import read_safetensors, save_adapter, write_safetensors
    from runner.pipeline_adapters import load_adapter_into

    pipe = tiny_sd_pipeline()
    unet, te = _random_lora(pipe)
    expected = denoiser_outputs(unet, te)[1]
    save_adapter(tmp_path / "old", {"unet": unet, "text_encoder": te}, base_model="tiny-sd")
    path = tmp_path / "old" / "text_encoder" / "adapter_model.safetensors"
    tensors, meta = read_safetensors(path)
    old = {k.replace("base_model.model.", "base_model.model.text_model."): v for k, v in tensors.items()}
    write_safetensors(path, old, meta)
    fresh = tiny_sd_pipeline()
    load_adapter_into(fresh, tmp_path / "old", "old")
    torch.testing.assert_close(
        denoiser_outputs(fresh.unet, fresh.text_encoder)[1], expected, rtol=0, atol=1e-5
    )


def test_diffusers_and_kohya_files_load_in_diffusers(tmp_path):
    """diffusers reads both single files at the adapter's own strength (alpha != r)."""
    import torch

    from runner.adapters import DIFFUSERS_WEIGHTS, read_safetensors, save_adapter
    from runner.pipeline_adapters import unload_adapters

    pipe = tiny_sd_pipeline()
    # The recipe's text-encoder targets, q_proj and v_proj: diffusers 0.42 recognises a kohya
    # text-encoder LoRA only with out_proj, which the file completes with zero-valued entries.
    unet, te = _random_lora(pipe, te_config=dict(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj"]))
    expected_unet, expected_hidden = denoiser_outputs(unet, te)
    save_adapter(tmp_path / "dog", {"unet": unet, "text_encoder": te}, base_model="tiny-sd")
    kohya, _ = read_safetensors(tmp_path / "dog" / "dog.safetensors")
    for layer in range(2):  # every attention block has all four projections (A1111 on SD 2.x wants them)
        block = f"lora_te_text_model_encoder_layers_{layer}_self_attn"
        assert all(f"{block}_{p}.lora_up.weight" in kohya for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
        assert not kohya[f"{block}_k_proj.lora_up.weight"].any()
        assert not kohya[f"{block}_out_proj.lora_up.weight"].any()
        assert kohya[f"{block}_q_proj.lora_up.weight"].any()
    for weight_name in (DIFFUSERS_WEIGHTS, "dog.safetensors"):
        fresh = tiny_sd_pipeline()
        fresh.load_lora_weights(str(tmp_path / "dog"), weight_name=weight_name, adapter_name="dog")
        got_unet, got_hidden = denoiser_outputs(fresh.unet, fresh.text_encoder)
        torch.testing.assert_close(got_unet, expected_unet, rtol=0, atol=1e-4, msg=weight_name)
        torch.testing.assert_close(got_hidden, expected_hidden, rtol=0, atol=1e-4, msg=weight_name)
        unload_adapters(fresh)
        assert not getattr(fresh.unet, "peft_config", None)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_a_text_encoder_lora_without_attention_loads_from_the_diffusers_file(tmp_path, use_dora):
    """diffusers 0.42 tells a text encoder's PEFT-layout keys (`lora_A`) by its attention projections and
    refused a file with LoRA on the MLP alone ("Could not automatically infer state dict type"); such an
    encoder's keys are written in diffusers' own layout (`lora_linear_layer.down`), which it reads."""
    import warnings

    import torch

    from runner.adapters import DIFFUSERS_WEIGHTS, read_safetensors, save_adapter

    pipe = tiny_sd_pipeline()
    te_config = dict(r=2, lora_alpha=3, target_modules=["fc1", "fc2"], use_dora=use_dora)
    unet, te = _random_lora(pipe, te_config=te_config)
    expected_unet, expected_hidden = denoiser_outputs(unet, te)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_adapter(tmp_path / "dog", {"unet": unet, "text_encoder": te}, base_model="tiny-sd")
    assert not [w for w in caught if "diffusers" in str(w.message)]  # nothing to warn of any more
    tensors, _ = read_safetensors(tmp_path / "dog" / DIFFUSERS_WEIGHTS)
    assert "text_encoder.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight" in tensors
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in tensors
    fresh = tiny_sd_pipeline()
    base_hidden = denoiser_outputs(fresh.unet, fresh.text_encoder)[1]
    fresh.load_lora_weights(str(tmp_path / "dog"), weight_name=DIFFUSERS_WEIGHTS, adapter_name="dog")
    got_unet, got_hidden = denoiser_outputs(fresh.unet, fresh.text_encoder)
    assert not torch.allclose(got_hidden, base_hidden, atol=1e-3)  # the encoder's LoRA loaded
    torch.testing.assert_close(got_hidden, expected_hidden, rtol=0, atol=1e-4)
    torch.testing.assert_close(got_unet, expected_unet, rtol=0, atol=1e-4)


def test_read_adapter_config_of_an_empty_folder(tmp_path):
    from runner.adapters import read_adapter_config

    with pytest.raises(AdapterError, match="no adapter here"):
        read_adapter_config(tmp_path)
