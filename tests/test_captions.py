"""Per-image captions: which prompt each image trains with, how caption files enter the plan, and bad
caption files."""

from __future__ import annotations

import codecs
from pathlib import Path

import pytest

from runner import lockfile
from runner.errors import StepError
from runner.training.captions import image_prompts
from tests.conftest import write_image

TOY = 'instance_prompt = "a toy in the style of <1>"'
CAPTIONED = TOY + '\ncaption_extension = ".txt"\ntrigger = "<1> toy"'


def _folder(tmp_path: Path, captions: dict[str, bytes]) -> list[Path]:
    files = [write_image(tmp_path / f"{i:02d}.png", seed=i) for i in range(4)]
    for name, data in captions.items():
        (tmp_path / name).write_bytes(data)
    return files


def test_a_caption_replaces_the_prompt_and_trigger_is_substituted(tmp_path):
    files = _folder(
        tmp_path,
        {
            "00.txt": b"a photo of [trigger] on a red sofa\n",
            "02.txt": "un chien  en été\nà la plage".encode(),
        },
    )
    seen = []
    prompts = image_prompts(files, ".txt", "a photo of sks dog", "sks dog", seen.append)
    assert prompts == [
        "a photo of sks dog on a red sofa",
        "a photo of sks dog",
        "un chien en été à la plage",
        "a photo of sks dog",
    ]
    assert seen == []
    # Off: caption files are ignored.
    assert image_prompts(files, None, "p", "t", seen.append) == ["p"] * 4


def test_an_empty_caption_warns_and_uses_the_instance_prompt(tmp_path):
    files = _folder(tmp_path, {"01.txt": b"  \n"})
    seen = []
    assert image_prompts(files, ".txt", "p", None, seen.append)[1] == "p"
    assert seen == [f"warning: caption {tmp_path / '01.txt'} is empty; the instance prompt is used"]


def test_many_empty_captions_are_named_in_a_few_lines(tmp_path):
    files = [write_image(tmp_path / f"{i:02d}.png", seed=i) for i in range(6)]
    for i in range(6):
        (tmp_path / f"{i:02d}.txt").write_text("\n")
    seen = []
    assert image_prompts(files, ".txt", "p", None, seen.append) == ["p"] * 6
    assert seen == [
        f"warning: caption {tmp_path / f'{i:02d}.txt'} is empty; the instance prompt is used"
        for i in range(3)
    ] + [
        f"warning: 3 more captions in {tmp_path} are empty; the instance prompt is used: 03.txt, 04.txt, 05.txt"
    ]


def test_many_long_captions_are_named_in_a_few_lines(tmp_path):
    from types import SimpleNamespace

    from runner import families
    from runner.training.captions import long_captions

    def tokenizer(prompt, truncation):  # a token a word, with the start and end tokens
        return SimpleNamespace(input_ids=[0, *prompt.split(), 0])

    tokenizer.model_max_length = 4
    pipe = SimpleNamespace(tokenizer=tokenizer)
    captions = {tmp_path / f"{i}.txt": "a b c" + " d" * i for i in range(6)}  # 5 + i tokens
    said = long_captions(families.get("sd1"), pipe, captions)
    assert said[:3] == [
        f"warning: caption {tmp_path / f'{i}.txt'} is {5 + i} tokens; the text encoder reads 4, so the end is "
        f"cut off: {captions[tmp_path / f'{i}.txt']!r}"
        for i in range(3)
    ]
    assert said[3:] == [
        f"warning: 3 more captions in {tmp_path} are longer than the 4 tokens the text encoder reads, so their "
        "ends are cut off: 3.txt (8 tokens), 4.txt (9 tokens), 5.txt (10 tokens)"
    ]


@pytest.mark.parametrize(
    "data, message",
    [
        (
            b"\x89PNG\r\n\x1a\n\x00\x00",
            "is a binary file, not text; write the caption as UTF-8 text, or remove it",
        ),
        (b"caf\xe9", "is not UTF-8 text (byte 3); save it as UTF-8"),
        ("a dog".encode("utf-16"), "is UTF-16 text, not UTF-8; save it as UTF-8"),
        ("a dog".encode("utf-32"), "is UTF-32 text, not UTF-8; save it as UTF-8"),
        (codecs.BOM_UTF32_BE + "a dog".encode("utf-32-be"), "is UTF-32 text, not UTF-8; save it as UTF-8"),
    ],
    ids=["binary", "latin-1", "utf-16", "utf-32", "utf-32-be"],
)
def test_a_binary_or_non_utf8_caption_is_an_error_naming_it(tmp_path, data, message):
    files = _folder(tmp_path, {"03.txt": data})
    with pytest.raises(StepError) as info:
        image_prompts(files, ".txt", "p", None, print)
    assert str(info.value) == f"caption {tmp_path / '03.txt'} {message}"


def test_caption_files_that_are_not_read_are_warnings(tmp_path):
    """A caption whose extension differs in case is not found on a case-sensitive file system; captions
    under another extension leave every image on the instance prompt. Both said, neither an error."""
    from runner.training.captions import missing_captions

    files = _folder(tmp_path, {"00.txt": b"a dog on a sofa", "01.TXT": b"a dog asleep", "03.caption": b"x"})
    assert missing_captions(tmp_path, files, ".txt") == [
        f"warning: caption {tmp_path / '01.TXT'} is not read: its image's caption is 01.txt"
    ]
    assert missing_captions(tmp_path, files, ".cap") == [
        f"warning: caption_extension = '.cap', but no image in {tmp_path} has a caption file (such as 00.cap "
        "beside 00.png): every image trains on the instance prompt"
    ]
    (tmp_path / "01.TXT").unlink()
    assert missing_captions(tmp_path, files, ".txt") == []  # images without a caption: as documented
    many = [write_image(tmp_path / f"{i:02d}.png", seed=i) for i in range(4, 12)]
    for image in many:
        image.with_suffix(".Txt").write_text("a dog")
    said = missing_captions(tmp_path, many, ".txt")
    assert len(said) == 6 and said[-1] == (
        "warning: 3 more captions differ from their image's caption name only in case"
    )


@pytest.mark.torch
def test_a_train_step_names_the_captions_without_the_trigger(tmp_path):
    from dataclasses import replace

    from runner.training.data import read_images
    from runner.training.job import job_from_context
    from tests.steps_fixtures import draw_images, make_subject, train_context

    folder = draw_images(tmp_path / "dog", 4)
    (folder / "00.txt").write_text("a photo of [trigger] on a sofa")
    (folder / "01.txt").write_text("a photo of SKS dog asleep")  # the tokenizer reads it lower-case
    (folder / "02.txt").write_text("a photo of a dog in the grass")
    subject = replace(make_subject(folder), caption_extension=".txt", trigger="sks dog")
    said = []
    read_images(job_from_context(train_context(tmp_path, subject)), said.append)
    assert [line for line in said if "caption" in line] == [
        f"warning: caption {folder / '02.txt'} does not hold the trigger 'sks dog' (or [trigger]): its photo "
        "trains on words that do not name the subject"
    ]


def test_trigger_without_a_trigger_key_is_an_error(tmp_path):
    files = _folder(tmp_path, {"00.txt": b"[trigger] on grass"})
    with pytest.raises(StepError) as info:
        image_prompts(files, ".txt", "p", None, print)
    assert str(info.value) == (
        f"caption {tmp_path / '00.txt'} uses [trigger] but no trigger is set; set trigger in the subject's table "
        '(what [trigger] stands for, e.g. trigger = "sks dog"), or write those words in the caption'
    )


def test_trigger_in_the_instance_prompt_stands_for_the_trigger(proj, build, fake_steps):
    """Images without a caption train with the instance prompt: [trigger] there means what it means in
    captions, and the subject keys as if the words were written out."""
    build(proj)
    before = _fingerprint(proj, "train:toy")
    proj.edit(TOY, 'instance_prompt = "a toy in the style of [trigger]"\ntrigger = "<1>"')
    assert proj.load().subjects["toy"].instance_prompt == "a toy in the style of <1>"
    result, _ = build(proj)
    assert result.ok and fake_steps.ran == [] and _fingerprint(proj, "train:toy") == before
    # Without a trigger it stays as written, as it trained before [trigger] meant anything there.
    proj.edit('trigger = "<1>"\n', "")
    assert proj.load().subjects["toy"].instance_prompt == "a toy in the style of [trigger]"


def test_trigger_in_a_prompt_without_a_trigger_trains_as_written_with_a_warning(tmp_path):
    files = [tmp_path / "a.png", tmp_path / "b.png"]
    said: list[str] = []
    assert (
        image_prompts(files, None, "a photo of [trigger]", None, said.append) == ["a photo of [trigger]"] * 2
    )
    assert said == [
        "warning: the prompt 'a photo of [trigger]' uses [trigger] but the subject sets no trigger: it trains as written"
    ]
    said.clear()
    assert image_prompts(files, None, "a photo of sks dog", None, said.append) == ["a photo of sks dog"] * 2
    assert said == []


def test_caption_dropout_is_a_pure_function_of_seed_and_position():
    pytest.importorskip("torch")
    from runner.training.captions import dropped

    first = [dropped(0, "instance", p, 0.3) for p in range(400)]
    assert first == [dropped(0, "instance", p, 0.3) for p in range(400)]
    assert 80 < sum(first) < 160
    assert first != [dropped(1, "instance", p, 0.3) for p in range(400)]
    assert not any(dropped(0, "instance", p, 0) for p in range(50))


# --- the plan ------------------------------------------------------------------------------------------


def _fingerprint(proj, step_id):
    return lockfile.read(proj.lock)[step_id]["fingerprint"]


def test_caption_files_are_inputs_of_their_subject(proj, build, fake_steps):
    build(proj)
    before = _fingerprint(proj, "train:toy")
    # Turning captions on changes nothing while there are no caption files.
    proj.edit(TOY, CAPTIONED)
    result, rec = build(proj)
    assert result.ok and fake_steps.ran == []
    caption = proj.root / "data" / "toy" / "01.txt"
    steps = []
    for text, expected in (
        ("a [trigger] on a shelf", "caption data/toy/01.txt added"),
        ("a [trigger] on a table", "caption data/toy/01.txt changed"),
    ):
        caption.write_text(text)
        result, rec = build(proj)
        assert result.ok
        reasons = {sid: r for sid, _, r in rec.planned}
        assert reasons["train:toy"] == [expected]
        assert fake_steps.ran[0] == "train:toy"
        assert "train:dog" not in fake_steps.ran and "render:park" not in fake_steps.ran
        steps.append(_fingerprint(proj, "train:toy"))
    assert len({before, *steps}) == 3
    # Captions change nothing for another subject, nor a changed trigger while no caption is left.
    caption.unlink()
    proj.edit('trigger = "<1> toy"', 'trigger = "<2> toy"')
    result, rec = build(proj)
    reasons = {sid: r for sid, _, r in rec.planned}
    # Back to the fingerprint it had before captions: the first build's adapter comes from the run-cache.
    assert reasons["train:toy"] == ["caption data/toy/01.txt removed", "restorable from cache"]
    assert _fingerprint(proj, "train:toy") == before
    assert "train:toy" not in fake_steps.ran and "train:dog" not in fake_steps.ran


def test_a_trigger_change_reruns_a_captioned_subject(proj, build, fake_steps):
    proj.edit(TOY, CAPTIONED)
    (proj.root / "data" / "toy" / "00.txt").write_text("[trigger]")
    build(proj)
    proj.edit('trigger = "<1> toy"', 'trigger = "<2> toy"')
    result, rec = build(proj)
    reasons = {sid: r for sid, _, r in rec.planned}
    assert reasons["train:toy"] == ["captions.trigger '<1> toy' -> '<2> toy'"]


def test_the_watch_sees_caption_files(proj):
    from runner.watch import targets_of

    targets = targets_of(proj.path, proj.load())
    assert targets.relevant(str(proj.root / "data" / "toy" / "01.txt"))


# --- training on tiny-sd -------------------------------------------------------------------------------


def record_prompts(monkeypatch) -> list:
    """(kind, image index, prompt) of every example the train step embeds, as it asks for them."""
    from runner.training import captions

    used = []
    real_prompts_for = captions.prompts_for

    def record(examples, prompts, seed, dropout):
        texts = real_prompts_for(examples, prompts, seed, dropout)
        used.extend((kind, index, text) for (kind, index, _), text in zip(examples, texts, strict=True))
        return texts

    monkeypatch.setattr(captions, "prompts_for", record)
    return used


@pytest.mark.torch
@pytest.mark.parametrize("train_text_encoder", [False, True], ids=["frozen-te", "te-lora"])
def test_each_image_trains_with_its_own_prompt(tmp_path, monkeypatch, train_text_encoder):
    from dataclasses import replace

    from runner import families
    from runner.steps import train
    from tests.steps_fixtures import draw_images, make_prior, make_subject, train_context

    instance = draw_images(tmp_path / "dog", 3, size=(64, 64))
    classes = draw_images(tmp_path / "class", 2, size=(64, 64), seed=7)
    (instance / "00.png").with_suffix(".txt").write_text("a photo of [trigger] sitting on a red sofa")
    (instance / "02.png").with_suffix(".txt").write_text("sks dog, " + "very " * 90 + "good")
    names = sorted(p.name for p in instance.glob("*.png"))
    assert names == ["00.png", "01.png", "02.png"]

    used, tokenized = record_prompts(monkeypatch), []
    subject = make_subject(
        instance,
        prior="dog",
        train=dict(steps=6, batch_size=2, train_text_encoder=train_text_encoder),
    )
    subject = replace(subject, caption_extension=".txt", trigger="sks dog")
    prior = make_prior(num_images=2, caption_extension=".txt")
    (classes / "01.txt").write_text("a photo of a dog, [trigger]'s cousin" + ", very" * 80 + " old")
    ctx = train_context(tmp_path, subject, prior=prior, class_dir=classes)
    logs = []
    ctx.log = logs.append
    family = families.get("sd1")
    real_tokenize = family.tokenize

    def tokenize(pipe, prompts, device):
        tokenized.append(list(prompts))
        return real_tokenize(pipe, prompts, device)

    monkeypatch.setattr(family, "tokenize", tokenize)
    train.run(ctx)

    long = "sks dog, " + "very " * 90 + "good"
    expected = {
        ("instance", 0): "a photo of sks dog sitting on a red sofa",
        ("instance", 1): "a photo of sks dog",
        ("instance", 2): long,
        ("class", 0): "a photo of dog",
        ("class", 1): "a photo of a dog, sks dog's cousin" + ", very" * 80 + " old",
    }
    assert used and {(k, i): t for k, i, t in used} == expected
    assert all(expected[(k, i)] == t for k, i, t in used)
    assert {(k, i) for k, i, _ in used} == set(expected)  # every image was trained on
    # One tokenization of the distinct prompts, each once.
    assert sorted(tokenized[-1]) == sorted(set(expected.values()))
    warning = [m for m in logs if "caption" in m and "tokens" in m]
    assert len(warning) == 2 and all("reads 77" in line for line in warning)
    assert str(instance / "02.txt") in warning[0] and str(classes / "01.txt") in warning[1]


@pytest.mark.torch
def test_a_prior_copies_the_captions_of_given_class_images(tmp_path):
    from runner.steps import prior as prior_step
    from tests.steps_fixtures import draw_images, make_prior, prior_context

    given = draw_images(tmp_path / "given", 2, size=(64, 64))
    (given / "01.caption").write_text("a dog on a sofa")
    spec = make_prior(num_images=2, images=str(given), caption_extension=".caption")
    ctx = prior_context(tmp_path, spec)
    prior_step.run(ctx)
    assert sorted(p.name for p in ctx.out.iterdir()) == ["0000.png", "0001.png", "0001.txt"]
    assert (ctx.out / "0001.txt").read_text() == "a dog on a sofa"


def test_a_symlinked_folder_among_the_images_is_named_in_a_warning(tmp_path):
    """Its photos are not read (symlinked folders are not followed): said, not left out unsaid."""
    from runner.imagefiles import list_images, scan
    from runner.training.captions import unread_files

    folder, more = tmp_path / "dog", tmp_path / "more"
    folder.mkdir()
    more.mkdir()
    files = _folder(folder, {})
    _folder(more, {})
    (folder / "more").symlink_to(more, target_is_directory=True)
    (folder / "one.png").symlink_to(more / "00.png")  # a symlinked photo is read
    assert list_images(folder) == [*files, folder / "one.png"]
    assert unread_files(scan(folder), list_images(folder), None, "the instance prompt") == [
        f"warning: {folder}: not read, as dbl follows no symbolic link to a folder: more; copy their images "
        "in to train on them"
    ]


@pytest.mark.torch
def test_a_prior_names_the_users_caption_file_when_it_is_empty_or_not_text(tmp_path):
    """The train step reads the prior's copies (priors/<name>/0001.txt); what is wrong with a caption
    is said of the file the user can fix."""
    from runner.steps import prior as prior_step
    from tests.steps_fixtures import draw_images, make_prior, prior_context

    given = draw_images(tmp_path / "given", 2, size=(64, 64))
    (given / "00.txt").write_text(" \n")
    (given / "01.txt").write_bytes(b"caf\xe9")
    logs = []
    spec = make_prior(num_images=2, images=str(given), caption_extension=".txt")
    with pytest.raises(StepError) as info:
        prior_step.run(prior_context(tmp_path, spec, log=logs.append))
    assert str(info.value) == f"caption {given / '01.txt'} is not UTF-8 text (byte 3); save it as UTF-8"
    assert f"warning: caption {given / '00.txt'} is empty; the class prompt 'a photo of dog' is used" in logs


@pytest.mark.torch
def test_a_prior_names_many_empty_captions_in_a_few_lines(tmp_path):
    from runner.steps import prior as prior_step
    from tests.steps_fixtures import draw_images, make_prior, prior_context

    given = draw_images(tmp_path / "given", 5, size=(8, 8))
    for i in range(5):
        (given / f"{i:02d}.txt").write_text("")
    logs = []
    spec = make_prior(num_images=5, images=str(given), caption_extension=".txt")
    prior_step.run(prior_context(tmp_path, spec, log=logs.append))
    empty = [line for line in logs if "empty" in line]
    assert empty[3:] == [
        f"warning: 2 more captions in {given} are empty; the class prompt 'a photo of dog' is used: 03.txt, 04.txt"
    ]
    assert len(empty) == 4


def test_class_image_captions_are_inputs_of_their_prior(proj, build, fake_steps):
    proj.edit('class_prompt = "a photo of dog"', 'class_prompt = "a photo of dog"\nimages = "data/toy"')
    build(proj)
    before = _fingerprint(proj, "prior:dog")
    proj.edit('images = "data/toy"', 'images = "data/toy"\ncaption_extension = ".txt"')
    result, rec = build(proj)
    assert result.ok and fake_steps.ran == [] and _fingerprint(proj, "prior:dog") == before
    (proj.root / "data" / "toy" / "00.txt").write_text("a plush dog")
    result, rec = build(proj)
    reasons = {sid: r for sid, _, r in rec.planned}
    assert reasons["prior:dog"] == ["caption data/toy/00.txt added"]
    assert reasons["train:toy"] == []  # the subject reads no captions
    assert fake_steps.ran[0] == "prior:dog"


@pytest.mark.torch
def test_several_class_prompts_take_turns_and_each_class_image_trains_with_its_own(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from PIL import Image

    from runner.steps import prior as prior_step
    from runner.steps import train
    from runner.training.data import read_images
    from tests.steps_fixtures import draw_images, make_prior, make_subject, prior_context, train_context

    given = draw_images(tmp_path / "given", 1, size=(64, 64))
    prompts = ["a photo of dog", "a dog on grass"]
    spec = make_prior(num_images=3, images=str(given), class_prompt=prompts, steps=1)
    ctx = prior_context(tmp_path, spec)
    assert prior_step.run(ctx) == {"generated": 2, "given": 1, "batch_size": 2}
    names = sorted(p.name for p in ctx.out.iterdir())
    assert names == ["0000.png", "0000.txt", "0001.png", "0001.txt", "0002.png", "0002.txt"]
    # Image i's prompt is prompt i modulo two; the given image has no caption, so it gets its turn's.
    written = [(ctx.out / f"{i:04d}.txt").read_text() for i in range(3)]
    assert written == ["a photo of dog\n", "a dog on grass\n", "a photo of dog\n"]
    for i in (1, 2):  # generated with that prompt, as their PNG metadata says
        with Image.open(ctx.out / f"{i:04d}.png") as image:
            assert image.text["parameters"].startswith(prompts[i % 2] + "\nSteps: 1,")
    # The train step reads each class image's prompt from the prior's folder.
    job = SimpleNamespace(
        subject=make_subject(draw_images(tmp_path / "dog", 2)), prior=spec, class_dir=ctx.out
    )
    images, _ = read_images(job, print)
    assert images.prompts["class"] == ["a photo of dog", "a dog on grass", "a photo of dog"]
    # ... and trains each with it.
    used = record_prompts(monkeypatch)
    subject = make_subject(tmp_path / "dog", prior="dog", train=dict(steps=3, batch_size=2))
    train.run(train_context(tmp_path / "train", subject, prior=spec, class_dir=ctx.out))
    trained = {(index, text) for kind, index, text in used if kind == "class"}
    assert trained == {(0, prompts[0]), (1, prompts[1]), (2, prompts[0])}
    # One class prompt: no caption files, and the prompt for every class image.
    one = prior_context(tmp_path / "one", make_prior(num_images=2, steps=1))
    prior_step.run(one)
    assert sorted(p.name for p in one.out.iterdir()) == ["0000.png", "0001.png"]
    job = SimpleNamespace(subject=job.subject, prior=one.spec, class_dir=one.out)
    assert read_images(job, print)[0].prompts["class"] == ["a photo of dog"] * 2


def test_every_caption_that_cannot_be_used_is_said_in_one_error(tmp_path):
    """They were said one a build, each build loading the model first; the images that cannot be read
    are said all at once."""
    files = _folder(
        tmp_path,
        {
            "00.txt": b"caf\xe9",
            "01.txt": b"fine",
            "02.txt": b"\x89PNG\r\n\x1a\n\x00\x00",
            "03.txt": b"[trigger] dog",
        },
    )
    with pytest.raises(StepError) as info:
        image_prompts(files, ".txt", "p", None, print)
    assert str(info.value).splitlines() == [
        "3 captions cannot be used; fix or remove each:",
        f"  caption {tmp_path / '00.txt'} is not UTF-8 text (byte 3); save it as UTF-8",
        f"  caption {tmp_path / '02.txt'} is a binary file, not text; write the caption as UTF-8 text, or remove it",
        f"  caption {tmp_path / '03.txt'} uses [trigger] but no trigger is set; set trigger in the subject's table "
        '(what [trigger] stands for, e.g. trigger = "sks dog"), or write those words in the caption',
    ]
