"""blend:<name> - a weighted combination of trained adapters (or other blends) as a new adapter.

The parents are loaded onto a base model in fp32 on the CPU, combined with PEFT's
`add_weighted_adapter`, and the result is saved in the layout of a trained adapter, so that it loads
without its parents. Computing on the CPU in fp32 makes the blend's bytes the same on every machine,
whatever device the build trains on (the run-cache and the output hashes rely on that); blending is
a few matrix products per layer, so the GPU would save little.

Text encoder: when only some parents have a text-encoder LoRA, the blend's text encoder combines
those, at their weights. A parent without one leaves the text encoder as it is, so this is still the
weighted sum of what the parents do. No parent with one: the blend has none either.

dbl.json records the parents, the method and its parameters, and for every method the relative
error ||delta_blend - sum(w_i * delta_i)||_F / ||sum(w_i * delta_i)||_F per component: 0 for `cat`
(up to float error), and what a lossy method (svd, linear's cross terms, pruning) gave away.
"""

from __future__ import annotations

from pathlib import Path

from runner.errors import AdapterError, StepError
from runner.project import adapter_checks
from runner.project.problems import Source
from runner.project.schema import Blend
from runner.steps import KOHYA_STEM, Inputs, StepContext, StepKind, adapter_step, register


def run(ctx: StepContext) -> dict:
    import torch

    from runner import adapters, blending, pipeline_adapters

    spec = ctx.spec
    parents = [(name, float(weight), _parent_folder(ctx, name)) for name, weight in spec.adapters]
    pipe, shared = _fp32_cpu_pipeline(ctx, torch)
    # Internal names: the saved bytes must not depend on them, and they cannot clash with a parent.
    internal = [f"parent{i}" for i in range(len(parents))]
    try:
        for key, (name, _, folder) in zip(internal, parents, strict=True):
            try:
                pipeline_adapters.load_adapter_into(pipe, folder, key)
            except adapters.AdapterError as exc:
                raise StepError(
                    Source.of(ctx.project).problem(
                        f"blends.{ctx.name}",
                        f"cannot load {name!r} from {folder}: {exc}",
                        at=f"blends.{ctx.name}.adapters",
                    )
                ) from exc
        ctx.progress(1, 3)
        try:
            errors = blending.blend(
                pipe,
                dict(zip(internal, (w for _, w, _ in parents), strict=True)),
                "blend",
                spec.method,
                svd_rank=spec.svd_rank,
                svd_clamp=spec.svd_clamp,
                density=spec.density,
                majority_sign_method=spec.majority_sign_method,
                seed=ctx.project.settings.seed,
                activate=False,
            )
        except (AdapterError, ValueError) as exc:
            option = getattr(exc, "option", None)  # an error about one option names its line
            fix = getattr(exc, "fix", "")
            if option and getattr(
                exc, "unwritten", False
            ):  # left at its default: the table is where to set it
                option, fix = None, f"{fix} in [blends.{ctx.name}]"
            raise StepError(
                Source.of(ctx.project).problem(
                    f"blends.{ctx.name}", str(exc), fix, at=f"blends.{ctx.name}.{option}" if option else None
                )
            ) from exc
        ctx.progress(2, 3)

        family = ctx.models.family
        # The components some parent has a LoRA on: the denoiser always, the others when present.
        blended = {c.name: getattr(pipe, c.attr) for c in family.components if c.name in errors}
        ranks = {c: int(m.peft_config["blend"].r) for c, m in blended.items()}
        if spec.svd_rank is not None and spec.method in blending.SVD_METHODS:
            for c, m in blended.items():
                have = [
                    name for key, (name, _, _) in zip(internal, parents, strict=True) if key in m.peft_config
                ]
                if len(have) == 1 and ranks[c] > spec.svd_rank:
                    # PEFT combines a lone adapter linearly, whatever the method: nothing truncates it
                    ctx.log(
                        Source.of(ctx.project).warning(
                            f"blends.{ctx.name}",
                            f"only {have[0]} has a {c} LoRA, which PEFT copies as it is: it keeps rank "
                            f"{ranks[c]}, not svd_rank = {spec.svd_rank}",
                            at=f"blends.{ctx.name}.svd_rank",
                        )
                    )
        info = {
            "kind": "blend",
            "weights": [w for _, w, _ in parents],
            "method": spec.method,
            "svd_rank": spec.svd_rank,
            "svd_clamp": spec.svd_clamp,
            "density": spec.density,
            "majority_sign_method": spec.majority_sign_method,
            "seed": ctx.project.settings.seed,
            "rank": ranks,
            "relative_error": errors,
            "base_model": _base_model_name(parents, ctx, family),
        }
        adapters.save_adapter(
            ctx.out,
            blended,
            adapter_name="blend",
            base_model=info["base_model"],
            info=info,
            name=KOHYA_STEM,
            family=family,
        )
    finally:
        if shared:
            for key in ["blend", *internal]:
                pipeline_adapters.remove_adapter(pipe, key)
    ctx.progress(3, 3)
    summary = ", ".join(f"{c} {e:.2e}" for c, e in errors.items())
    ctx.log(f"{spec.method} blend of {', '.join(n for n, _, _ in parents)}: relative error {summary}")
    far = {c: e for c, e in errors.items() if e > FAR}
    if spec.method in APPROXIMATING and far:
        ctx.log(
            Source.of(ctx.project).warning(
                f"blends.{ctx.name}",
                f"the {spec.method} blend is far from the weighted sum of its parents' changes (relative error "
                + ", ".join(f"{e:.2f} on the {c}" for c, e in far.items())
                + ")",
                'method = "cat" is exact',
                at=f"blends.{ctx.name}.method",
            )
        )
    return {"relative_error": errors, "rank": ranks}


# Methods whose result is meant as the weighted sum of the parents' changes but can be far from it
# without the user asking for less (ties and dare drop parts of it by design, svd to the rank asked), and
# the relative error from which such a blend is said to be far from it.
APPROXIMATING = ("linear",)
FAR = 0.5


def _parent_folder(ctx: StepContext, name: str) -> Path:
    for step_id in (f"train:{name}", f"blend:{name}"):
        if step_id in ctx.inputs:
            return Path(ctx.inputs[step_id])
    raise StepError(
        f"blends.{ctx.name}: adapter {name!r} has no built outputs (inputs: {', '.join(ctx.inputs) or 'none'})"
    )


def _fp32_cpu_pipeline(ctx: StepContext, torch):
    """The build's shared pipeline when it is fp32 on the CPU (then restored afterwards), else a fresh load."""
    from runner.models import load_pipeline

    models = ctx.models
    if models.device == "cpu" and models.dtype == torch.float32:
        return models.pipeline(torch.float32), True
    return load_pipeline(models.base, dtype=torch.float32, device="cpu", family=models.family), False


def _base_model_name(parents, ctx: StepContext, family) -> str:
    # What the parents' PEFT configs say, so that the guide's inference code finds the same base model
    # (the guide reads the last component's: the text encoder's, for sd1).
    from runner.adapters import trained_on

    components = [c.name for c in reversed(family.components)]
    named = (trained_on(folder, components) for _, _, folder in parents)
    return next((base for base in named if base), ctx.models.base.recorded)


# --- the kind ------------------------------------------------------------------------------------------


def _deps(project, spec) -> list[str]:
    return [adapter_step(project, name) for name, _ in spec.adapters]


def _inputs(i: Inputs) -> dict:
    spec = i.spec
    inputs = {"version": KIND.version, "seed": i.settings.seed}
    inputs.update(i.fields(spec, exclude=("adapters",)))
    inputs["adapters"] = [
        {"_name": name, "output": i.output(dep), "weight": weight}
        for (name, weight), dep in zip(spec.adapters, i.step.deps, strict=True)
    ]
    return inputs


KIND = register(
    StepKind(
        name="blend",
        table="blends",
        spec=Blend,
        output_dir="blends",
        version=1,
        run=run,
        inputs=_inputs,
        deps=_deps,
        doc="combines trained adapters with weights into a new adapter",
        produces_adapter=True,
        check=adapter_checks.check_blends,
        layout=lambda name: {f"{KOHYA_STEM}.safetensors": f"{name}.safetensors"},
        unit=("stage", ""),  # its parents loaded, merged, saved
    )
)
