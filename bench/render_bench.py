"""Images per second of dbl's render step against the notebook way, on tiny-sd.

    python bench/render_bench.py [--prompts 2] [--seeds 4] [--steps 20] [--repeat 3] [--json]

The notebook way is the PEFT guide's inference code run once per image: load the pipeline, wrap the
UNet and the text encoder with `PeftModel.from_pretrained`, render one image, save it. dbl's render step
loads the base pipeline once per build (the shared ModelCache) and the adapter once per render, and
renders `batch_size` images per forward pass. Both render the same prompts x seeds with the same
adapter, steps and guidance; tiny-sd is so small that loading dominates, which is the point on a real
model too (seconds to load, and the adapter load repeated for every image). Each contender runs
`--repeat` times, interleaved, and the fastest run counts (a busy machine only ever slows a run down).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_adapter(folder: Path) -> Path:
    """A random rank-4 LoRA on tiny-sd's UNet and text encoder, saved in dbl's adapter layout."""
    import torch
    from peft import LoraConfig, get_peft_model

    from runner.adapters import save_adapter
    from runner.models import BaseModel, load_pipeline

    pipe = load_pipeline(BaseModel.parse("tiny-sd", ROOT))
    torch.manual_seed(0)
    unet = get_peft_model(
        pipe.unet, LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    )
    te = get_peft_model(
        pipe.text_encoder,
        LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    save_adapter(folder, {"unet": unet, "text_encoder": te}, base_model="tiny-sd")
    return folder


def dbl_render(
    adapter: Path, out: Path, prompts, seeds, steps, batch_size, models=None, device="cpu"
) -> float:
    """Seconds for one render step; with `models` None, a new ModelCache (the pipeline load included)."""
    from types import SimpleNamespace

    from runner.models import BaseModel, ModelCache
    from runner.project.schema import ProjectSettings, Render
    from runner.steps import StepContext, render

    start = time.perf_counter()
    models = models or ModelCache(BaseModel.parse("tiny-sd", ROOT), device=device)
    spec = Render(
        name="bench", adapter="subject", prompts=prompts, seeds=seeds, steps=steps, batch_size=batch_size
    )
    out.mkdir(parents=True)
    ctx = StepContext(
        step_id="render:bench",
        kind="render",
        name="bench",
        spec=spec,
        project=SimpleNamespace(settings=ProjectSettings(base_model="tiny-sd")),
        work=out.parent,
        out=out,
        inputs={"train:subject": adapter},
        models=models,
    )
    render.run(ctx)
    return time.perf_counter() - start


def notebook_render(adapter: Path, out: Path, prompts, seeds, steps, device="cpu") -> float:
    """Seconds for the guide's inference code, one image per call, as a notebook loop runs it."""
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import PeftModel

    from runner.models import ensure_builtin

    base = ensure_builtin("tiny-sd")
    out.mkdir(parents=True)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        for seed in seeds:
            pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32).to(device)
            pipe.set_progress_bar_config(disable=True)
            pipe.unet = PeftModel.from_pretrained(pipe.unet, adapter / "unet", adapter_name="subject")
            pipe.text_encoder = PeftModel.from_pretrained(
                pipe.text_encoder, adapter / "text_encoder", adapter_name="subject"
            )
            image = pipe(
                prompt,
                num_inference_steps=steps,
                guidance_scale=7.5,
                generator=torch.Generator().manual_seed(seed),
            ).images[0]
            image.save(out / f"{i}-{seed}.png")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each contender; the fastest counts")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the notebook loop runs there too)")
    parser.add_argument("--json", action="store_true", help="print only the JSON")
    args = parser.parse_args()

    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    from runner.models import BaseModel, ModelCache, ensure_builtin

    ensure_builtin("tiny-sd")
    prompts = [f"a photo of sks dog, take {i}" for i in range(args.prompts)]
    seeds = list(range(args.seeds))
    images = len(prompts) * len(seeds)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adapter = make_adapter(tmp / "adapter")
        results: dict[str, float] = {}

        def keep(key: str, seconds: float) -> None:
            results[key] = min(seconds, results.get(key, float("inf")))

        # Warm the libraries' lazy imports once so that no contender pays for them.
        notebook_render(adapter, tmp / "warmup", prompts[:1], seeds[:1], 1, args.device)
        shared = ModelCache(BaseModel.parse("tiny-sd", ROOT), device=args.device)
        shared.pipeline()
        for run in range(args.repeat):
            keep(
                "notebook (load per image)",
                notebook_render(adapter, tmp / f"nb{run}", prompts, seeds, args.steps, args.device),
            )
            cold = dbl_render(adapter, tmp / f"cold{run}", prompts, seeds, args.steps, 1, device=args.device)
            keep("dbl render, batch 1, pipeline load included", cold)
            for batch in (1, 4):
                seconds = dbl_render(
                    adapter, tmp / f"b{batch}-{run}", prompts, seeds, args.steps, batch, shared
                )
                keep(f"dbl render, batch {batch}, shared pipeline", seconds)

    report = {
        "model": "tiny-sd (64x64)",
        "images": images,
        "steps": args.steps,
        "device": args.device,
        "repeat": args.repeat,
        "torch_threads": torch.get_num_threads(),
        "results": {
            k: {"seconds": round(s, 3), "images_per_s": round(images / s, 2)} for k, s in results.items()
        },
    }
    baseline = results["notebook (load per image)"]
    for key, seconds in results.items():
        report["results"][key]["speedup"] = round(baseline / seconds, 2)
    print(json.dumps(report, indent=2))
    if not args.json:
        where = f"{args.device}, {torch.get_num_threads()} threads"
        print(f"\n{images} images, {args.steps} steps, tiny-sd, {where}, fastest of {args.repeat}")
        print(f"{'':48} {'seconds':>8} {'images/s':>9} {'speedup':>8}")
        for key, row in report["results"].items():
            print(f"{key:48} {row['seconds']:8.2f} {row['images_per_s']:9.2f} {row['speedup']:7.2f}x")


if __name__ == "__main__":
    main()
