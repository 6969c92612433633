"""A train step reads its prior's first class prompt for class images without a caption (or with an empty
one). Where the prior's outputs do not hold that prompt (every class image the user's own, no generated
one, no caption written), the prompt is in neither the prior's output bytes nor the train step's
fingerprint: the train step keeps it as a display input, is stale when it changes, and restores from the
run-cache only the adapter trained on the current one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from runner import lockfile
from tests.cache_trust_fixtures import build_with
from tests.conftest import PETS, Proj, write_image

CLASS_IMAGES = 'class_prompt = "a photo of dog"\nnum_images = 2\nimages = "data/cls"'
REASON = "prior's class prompt 'a photo of dog' -> 'a photo of a cat', which training reads for class images without captions"


def real_prior(run):
    """The fake steps, with the real prior step (it copies the user's class images: no model is loaded)
    and a train step whose adapter holds the prompt of each class image, as the trainer reads them."""

    def step(ctx):
        if ctx.kind == "prior":
            from runner.steps import prior

            return prior.run(ctx)
        result = run(ctx)
        if ctx.kind == "train" and ctx.spec.prior:
            from runner.training.captions import image_prompts

            spec = ctx.project.priors[ctx.spec.prior]
            folder = ctx.inputs[f"prior:{spec.name}"]
            files = sorted(p for p in folder.iterdir() if p.suffix != ".txt")
            extension = ".txt" if spec.has_captions else None
            trigger = ctx.spec.trigger
            prompts = image_prompts(files, extension, spec.prompts[0], trigger, lambda message: None)
            (ctx.out / "class_prompts.json").write_text(json.dumps(prompts))
        return result

    return step


def project(root: Path, captions: dict[int, str] | None = None, prompts: str = '"a photo of dog"') -> Proj:
    text = PETS.replace('class_prompt = "a photo of dog"\nnum_images = 2', CLASS_IMAGES)
    text = text.replace('class_prompt = "a photo of dog"', f"class_prompt = {prompts}")
    root.mkdir(exist_ok=True)
    if captions is not None:
        text = text.replace('images = "data/cls"', 'images = "data/cls"\ncaption_extension = ".txt"')
    p = Proj(root, text)
    for i in range(2):
        write_image(root / "data" / "cls" / f"{i:02d}.png", seed=20 + i)
    for i, caption in (captions or {}).items():
        (root / "data" / "cls" / f"{i:02d}.txt").write_bytes(caption.encode("utf-8"))
    return p


def build(p: Proj):
    """Build with the real prior; (result, reporter, the steps that ran, not restored)."""
    result, rec, _ = build_with(p, real_prior)
    return result, rec, [e[1] for e in rec.events if e[0] == "end" and e[2] == "done"]


def adapter(root: Path) -> bytes:
    return (root / "build/pets/adapters/dog/class_prompts.json").read_bytes()


def clean_build(root: Path, p: Proj) -> bytes:
    root.mkdir()
    fresh = Proj(root, p.path.read_text())
    for image in (p.root / "data" / "cls").iterdir():
        (root / "data" / "cls").mkdir(exist_ok=True)
        (root / "data" / "cls" / image.name).write_bytes(image.read_bytes())
    build(fresh)
    return adapter(root)


@pytest.mark.parametrize("captions", [None, {0: "a dog on grass"}, {0: "a dog on grass", 1: " \n"}])
def test_a_changed_class_prompt_retrains_where_training_reads_it(tmp_path, captions):
    p = project(tmp_path / "p", captions)
    build(p)
    first = adapter(p.root)
    p.edit('"a photo of dog"', '"a photo of a cat"')
    result, rec, ran = build(p)
    assert result.ok and ran[:2] == ["prior:dog", "train:dog"]
    assert REASON in dict((s, r) for s, _, r in rec.planned)["train:dog"]
    assert adapter(p.root) != first
    assert adapter(p.root) == clean_build(tmp_path / "clean", p)
    assert build(p)[2] == []
    # Back to the first prompt: the prior comes back from the run-cache, and the adapter trained on the
    # other prompt, which the run-cache holds under the same fingerprint, is not restored.
    p.edit('"a photo of a cat"', '"a photo of dog"')
    result, rec, ran = build(p)
    assert result.ok and ran[0] == "train:dog" and "prior:dog" not in ran
    assert adapter(p.root) == first
    # The entry it stored instead is restored under the prompt it was trained on.
    shutil.rmtree(p.root / "build")
    p.lock.unlink()
    result, rec, ran = build(p)
    assert result.ok and "train:dog" not in ran and adapter(p.root) == first


@pytest.mark.parametrize(
    "captions, prompts",
    [
        ({0: "a dog on grass", 1: "a dog asleep"}, '"a photo of dog"'),  # every class image has a caption
        (None, '["a photo of dog", "a photo of a dog"]'),  # the prior writes each image's prompt beside it
    ],
)
def test_a_class_prompt_training_does_not_read_keeps_the_train_step(tmp_path, captions, prompts):
    p = project(tmp_path, captions, prompts)
    build(p)
    first = adapter(p.root)
    p.edit('"a photo of dog"', '"a photo of a cat"')
    result, rec, ran = build(p)
    assert result.ok and "prior:dog" in ran
    if captions is not None:  # the prior's outputs are the same bytes: nothing else runs
        assert ran == ["prior:dog"] and adapter(p.root) == first
    assert not any("class prompt" in r for _, _, reasons in rec.planned for r in reasons)


def test_a_lockfile_written_before_the_class_prompt_was_kept_stays_fresh(tmp_path):
    p = project(tmp_path)
    build(p)
    records = lockfile.read(p.lock)
    assert records["train:dog"]["inputs"]["prior"]["_class_prompt"] == "a photo of dog"
    steps = {sid: dict(record) for sid, record in records.items()}
    for record in steps.values():  # as an older dbl wrote them
        record["inputs"].get("prior", {}).pop("_class_prompt", None)
    lockfile.write(p.lock, steps)
    result, rec, ran = build(p)
    assert result.ok and ran == []
    # The build writes the prompt in (taken as the one it was trained on), so that a change is seen.
    assert lockfile.read(p.lock)["train:dog"]["inputs"]["prior"]["_class_prompt"] == "a photo of dog"
    p.edit('"a photo of dog"', '"a photo of a cat"')
    result, rec, ran = build(p)
    assert ran[:2] == ["prior:dog", "train:dog"]
    assert REASON in dict((s, r) for s, _, r in rec.planned)["train:dog"]


def train_inputs(p: Proj) -> dict:
    from runner import planner
    from runner.fingerprint import FileHasher
    from runner.store import DiskFacts, RunCache

    loaded = p.load()
    facts = DiskFacts(loaded, FileHasher(p.root / "hashes.json"), RunCache(p.root / "cache"))
    step = next(s for s in planner.graph(loaded) if s.id == "train:dog")
    return planner.step_inputs(loaded, step, facts, {"prior:dog": "0" * 64})


@pytest.mark.parametrize(
    "num_images, prompts, captions, kept",
    [
        (2, '"a photo of dog"', None, True),  # every class image the user's: nothing holds the prompt
        (3, '"a photo of dog"', None, False),  # the generated image records it
        (2, '"a photo of dog"', {0: "a dog", 1: ""}, True),  # an empty caption trains on it
        (2, '"a photo of dog"', {0: "a dog", 1: "a dog asleep"}, False),  # training does not read it
        (2, '["a photo of dog", "a photo of a dog"]', None, False),  # written beside image 0
        (2, '["a photo of dog", "a photo of a dog"]', {0: "a dog", 1: "\ufeff"}, True),  # read for image 1
        (2, '["a photo of dog", "a photo of a dog"]', {1: ""}, False),  # written beside image 0
        (4, '["a photo of dog", "a photo of a dog"]', {0: "a dog", 1: ""}, False),  # image 2 is generated
    ],
)
def test_the_class_prompt_is_kept_where_only_the_train_step_holds_it(
    tmp_path, num_images, prompts, captions, kept
):
    p = project(tmp_path, captions, prompts)
    p.edit("num_images = 2", f"num_images = {num_images}")
    inputs = train_inputs(p)
    assert ("_class_prompt" in inputs["prior"]) == kept
    assert inputs["prior"].get("_class_prompt", "a photo of dog") == "a photo of dog"


def test_a_changed_trigger_retrains_where_only_class_captions_use_it(tmp_path):
    """[trigger] in a class caption is the subject's trigger, which its fingerprint holds only with
    captions of its own."""
    p = project(tmp_path / "p", {0: "a photo of [trigger] next to a bag", 1: "a bag"})
    p.edit('prior = "dog"', 'prior = "dog"\ntrigger = "sks"')
    build(p)
    first = adapter(p.root)
    p.edit('trigger = "sks"', 'trigger = "zzz"')
    result, rec, ran = build(p)
    assert result.ok and ran[:1] == ["train:dog"]
    reasons = dict((s, r) for s, _, r in rec.planned)["train:dog"]
    assert "trigger 'sks' -> 'zzz', which replaces [trigger] in class captions" in reasons
    assert adapter(p.root) != first
    assert adapter(p.root) == clean_build(tmp_path / "clean", p)


def test_a_class_prompt_written_beside_its_images_with_trigger_keeps_the_trigger(tmp_path):
    p = project(tmp_path, None, '["a photo of dog", "a photo of [trigger] dog"]')
    assert "_trigger" not in train_inputs(p)["prior"]  # the subject has no trigger: nothing replaces it
    p.edit('prior = "dog"', 'prior = "dog"\ntrigger = "sks"')
    assert train_inputs(p)["prior"]["_trigger"] == "sks"
