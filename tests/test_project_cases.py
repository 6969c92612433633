"""Project files: each problem of names, tables and references gives an exact, located message."""

from __future__ import annotations

import pytest

from tests.project_fixtures import assert_problem_said, folder, problems  # noqa: F401 (a fixture)

CASES = [
    (
        "a snapshot at a step the subject does not save",
        '[renders.r]\nadapter = "dog@400"\nprompts = ["x"]\n',
        "renders.r.adapter: 'dog@400' is not a subject or blend (line {line}) - add 400 to the save_steps of dog; "
        "subjects: dog, toy; blends: mix; or 'none'",
    ),
    (
        "a snapshot at the subject's last step",
        '[renders.r]\nadapter = "dog@800"\nprompts = ["x"]\n',
        "renders.r.adapter: 'dog@800' is not a subject or blend (line {line}) - step 800 is the last of dog: "
        "its adapter is 'dog'",
    ),
    (
        "a snapshot the subject saves, written with a leading zero (it said to add 0400 to save_steps)",
        '[subjects.dog.train]\nsave_steps = [400]\n[renders.r]\nadapter = "dog@0400"\nprompts = ["x"]\n',
        "renders.r.adapter: 'dog@0400' is not a subject, snapshot or blend (line {line}) - write it without leading "
        "zeros: 'dog@400'",
    ),
    (
        "a snapshot at step 0 (it said to add 0 to save_steps, which refuses it)",
        '[renders.r]\nadapter = "dog@0"\nprompts = ["x"]\n',
        "renders.r.adapter: 'dog@0' is not a subject or blend (line {line}) - step 0 is dog's base model: "
        "write 'none' for the base model alone; subjects: dog, toy; blends: mix; or 'none'",
    ),
    (
        "a NUL character in a path (the OS refuses it: it was an unexpected ValueError)",
        '[subjects.cat]\nimages = "data/\\u0000dog"\ninstance_prompt = "a photo of sks cat"\n',
        "subjects.cat.images: holds a NUL character (\\u0000) (line {line}) - remove it",
    ),
    (
        "a snapshot its subject saves, named in a blend",
        '[subjects.dog.train]\nsave_steps = [400]\n[blends.duo]\nadapters = { "dog@400" = 1.0, toy = 1.0 }\n',
        "blends.duo.adapters.dog@400: 'dog@400' is a snapshot of dog, and a blend combines subjects and "
        "blends only (line {line}) - blend 'dog' (its last step), or render 'dog@400' on its own",
    ),
    (
        "a snapshot step in digits int() does not read",
        '[renders.r]\nadapter = "dog@²"\nprompts = ["x"]\n',
        "renders.r.adapter: 'dog@²' is not a subject or blend (line {line}) - subjects: dog, toy; blends: mix; "
        "or 'none'",
    ),
    (
        "unknown key",
        "[subjects.dog.lora]\nrnak = 3\n",
        "subjects.dog.lora: unknown key 'rnak' (line {line}) - did you mean 'rank'?",
    ),
    (
        "unknown table",
        "[subject.cat]\nimages = 'x'\n",
        "unknown key 'subject' (line {line}) - did you mean 'subjects'?",
    ),
    (
        "wrong type",
        '[train]\nsteps = "many"\n',
        "train.steps: expected an integer, got the string 'many' (line {line}) - e.g. steps = 800",
    ),
    (
        "bad choice",
        '[train]\nlr_scheduler = "cosin"\n',
        "train.lr_scheduler: 'cosin' is not one of constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial (line {line}) - did you mean 'cosine'?",
    ),
    (
        "below minimum",
        "[lora]\nrank = 0\n",
        "lora.rank: must be at least 1, got 0 (line {line}) - e.g. rank = 16",
    ),
    (
        "missing key",
        '[subjects.cat]\nimages = "data/dog"\n',
        "subjects.cat: missing required key 'instance_prompt' (prompt with the subject's identifier, e.g. 'a photo of sks dog') (line {line}) - add instance_prompt = ...",
    ),
    (
        "unknown prior",
        '[subjects.cat]\nimages = "data/dog"\ninstance_prompt = "x"\nprior = "cat"\n',
        "subjects.cat.prior: 'cat' is not a prior (line {line}) - priors: dog",
    ),
    (
        "missing folder",
        '[subjects.cat]\nimages = "data/cat"\ninstance_prompt = "x"\n',
        "subjects.cat.images: folder data/cat does not exist (line {line}) - put the images in {folder}/data/cat",
    ),
    (
        "a photo named instead of its folder",
        '[subjects.cat]\nimages = "data/dog/00.png"\ninstance_prompt = "x"\n',
        "subjects.cat.images: data/dog/00.png is a file, not a folder (line {line}) - name the folder of the "
        'images, e.g. images = "data/dog"',
    ),
    (
        "bad name",
        '[subjects."my dog"]\nimages = "data/dog"\ninstance_prompt = "x"\n',
        "subjects.my dog: name 'my dog' may only hold letters, digits, '_' and '-' (line {line}) - rename the table",
    ),
    (
        "escaping name",
        '[renders."../etc"]\nadapter = "dog"\nprompts = ["x"]\n',
        "renders.../etc: name '../etc' may only hold letters, digits, '_' and '-' (line {line}) - rename the table",
    ),
    (
        "unknown blend parent",
        "[blends.duo]\nadapters = { dog = 1.0, cat = 0.5 }\n",
        "blends.duo.adapters.cat: 'cat' is not a subject or blend (line {line}) - subjects: dog, toy; blends: mix",
    ),
    (
        "unknown render adapter",
        '[renders.r]\nadapter = "cat"\nprompts = ["x"]\n',
        "renders.r.adapter: 'cat' is not a subject or blend (line {line}) - subjects: dog, toy; blends: mix; or 'none'",
    ),
    (
        "render with adapter and adapters",
        '[renders.r]\nadapter = "dog"\nadapters = ["dog", "toy"]\nprompts = ["x"]\n',
        "renders.r.adapters: adapter and adapters are both given (line {line}) - keep adapter for one adapter, or adapters for one grid column per adapter",
    ),
    (
        "render with no adapter",
        '[renders.r]\nprompts = ["x"]\n',
        "renders.r: missing required key 'adapter' or 'adapters' (line {line}) - add adapter = \"...\" (a subject, a blend, or 'none' for the base model), or adapters = [\"...\", \"...\"] for one grid column per adapter",
    ),
    (
        "unknown adapter in a render's list",
        '[renders.r]\nadapters = ["dog", "none", "cat"]\nprompts = ["x"]\n',
        "renders.r.adapters: 'cat' is not a subject or blend (line {line}) - subjects: dog, toy; blends: mix; or 'none'",
    ),
    (
        "empty adapters",
        '[renders.r]\nadapters = []\nprompts = ["x"]\n',
        'renders.r.adapters: must not be empty (line {line}) - give at least one value, e.g. adapters = ["..."]',
    ),
    (
        "adapter listed twice",
        '[renders.r]\nadapters = ["dog", "mix", "dog"]\nprompts = ["x"]\n',
        "renders.r.adapters: 'dog' is listed twice (line {line}) - list each adapter once",
    ),
    (
        "svd clamp is a quantile",
        '[blends.t]\nadapters = { dog = 1.0, toy = 1.0 }\nmethod = "svd"\nsvd_clamp = 5\n',
        "blends.t.svd_clamp: must be at most 1, got 5.0 (line {line}) - e.g. svd_clamp = 0.99",
    ),
    (
        "density needed",
        '[blends.t]\nadapters = { dog = 1.0, toy = 1.0 }\nmethod = "ties"\n',
        "blends.t.method: method 'ties' needs a density (line {line}) - add density = 0.5 (fraction of weights kept)",
    ),
    (
        "equal ranks",
        '[subjects.dog.lora]\nrank = 8\n[blends.lin]\nadapters = { dog = 1.0, toy = 1.0 }\nmethod = "linear"\n',
        'blends.lin.method: method \'linear\' needs equal unet ranks, got dog = 8, toy = 16 (line {line}) - give the subjects the same lora.rank, or use method = "cat" (exact) or "svd"',
    ),
    (
        "empty prompts",
        '[renders.r]\nadapter = "dog"\nprompts = []\n',
        'renders.r.prompts: must not be empty (line {line}) - give at least one value, e.g. prompts = ["..."]',
    ),
    (
        "size multiple of 8",
        '[renders.r]\nadapter = "dog"\nprompts = ["x"]\nwidth = 100\n',
        "renders.r.width: must be a multiple of 8, got 100 (line {line}) - e.g. width = 104",
    ),
    (
        "blend cycle",
        "[blends.a]\nadapters = { b = 1.0 }\n[blends.b]\nadapters = { a = 1.0 }\n",
        "blends.a.adapters: blend 'a' depends on itself: a -> b -> a (line {line}) - remove the cycle between blends",
    ),
    (
        "pickle base",
        None,
        "project.base_model: 'model.ckpt' is a pickle checkpoint, which can run arbitrary code when loaded (line 3) - convert it to .safetensors, or set allow_pickle = true in [project] if you trust it",
    ),
    (
        "seed out of range",
        '[renders.r]\nadapter = "dog"\nprompts = ["x"]\nseeds = [0, 18446744073709551616]\n',
        "renders.r.seeds: must be at most 9223372036854775807, got 18446744073709551616 (line {line}) - e.g. seeds = [0]",
    ),
    (
        "reserved name",
        '[subjects.none]\nimages = "data/dog"\ninstance_prompt = "x"\n',
        "subjects.none: 'none' is reserved for rendering the base model (line {line}) - rename it",
    ),
    (
        "subject named like the diffusers file",
        '[subjects.pytorch_lora_weights]\nimages = "data/dog"\ninstance_prompt = "x"\n',
        "subjects.pytorch_lora_weights: 'pytorch_lora_weights' would name the kohya file "
        "pytorch_lora_weights.safetensors, which replaces the diffusers file pytorch_lora_weights.safetensors "
        "in the same folder (line {line}) - rename it",
    ),
    (
        "blend named like the diffusers file, in another case",
        "[blends.PyTorch_LoRA_Weights]\nadapters = { dog = 1.0, toy = 1.0 }\n",
        "blends.PyTorch_LoRA_Weights: 'PyTorch_LoRA_Weights' would name the kohya file "
        "PyTorch_LoRA_Weights.safetensors, which replaces the diffusers file pytorch_lora_weights.safetensors "
        "in the same folder (line {line}) - rename it",
    ),
    (
        "caption extension without a dot",
        '[subjects.cat]\nimages = "data/dog"\ninstance_prompt = "x"\ncaption_extension = "txt"\n',
        "subjects.cat.caption_extension: 'txt' is not a file extension (line {line}) - write it with its dot, e.g. '.txt'",
    ),
    (
        "caption extension of images",
        '[subjects.cat]\nimages = "data/dog"\ninstance_prompt = "x"\ncaption_extension = ".png"\n',
        "subjects.cat.caption_extension: '.png' is an image extension (line {line}) - captions are text files, e.g. '.txt'",
    ),
    (
        "class caption extension without a dot",
        '[priors.cat]\nclass_prompt = "a cat"\ncaption_extension = "caption"\n',
        "priors.cat.caption_extension: 'caption' is not a file extension (line {line}) - write it with its dot, e.g. '.txt'",
    ),
    (
        "class prompts not strings",
        '[priors.cat]\nclass_prompt = ["a cat", 3]\n',
        'priors.cat.class_prompt: expected a string, or a list of strings, got a list of strings and integers (line {line}) - e.g. class_prompt = "a photo of dog"',
    ),
    (
        "no class prompt in the list",
        "[priors.cat]\nclass_prompt = []\n",
        'priors.cat.class_prompt: names no prompt (line {line}) - give one or more, e.g. class_prompt = "a photo of dog"',
    ),
    (
        "trigger not a string",
        '[subjects.cat]\nimages = "data/dog"\ninstance_prompt = "x"\ntrigger = 3\n',
        'subjects.cat.trigger: expected a string, got int 3 (line {line}) - e.g. trigger = "..."',
    ),
    (
        "bucket step not a multiple of 8",
        "[train]\nbuckets = true\nbucket_step = 12\n",
        "train.bucket_step: 12 is not a multiple of 8 (line {line}) - use 8 or 16",
    ),
    (
        "bucket min side above resolution",
        "[subjects.dog.train]\nbuckets = true\nbucket_min_side = 1024\n",
        "subjects.dog.train.bucket_min_side: 1024 is above resolution 512 (line {line}) - use at most 512",
    ),
    (
        "bucket max side below resolution",
        "[train]\nbuckets = true\nbucket_max_side = 256\n",
        "train.bucket_max_side: 256 is below resolution 512 (line {line}) - use at least 512",
    ),
    (
        "bucket step rounds the default shortest side past the resolution",
        "[train]\nresolution = 40\nbuckets = true\nbucket_step = 64\n",
        "train.bucket_step: 64 rounds the shortest bucket side up to 64, past resolution 40 (line {line}) - "
        "use a step that divides the resolution, e.g. 40",
    ),
    (
        "bucket step rounds a longest side past the resolution",
        "[train]\nresolution = 40\nbuckets = true\nbucket_max_side = 48\nbucket_step = 32\n",
        "train.bucket_step: 32 rounds the longest bucket side down to 32, past resolution 40 (line {line}) - "
        "use a step that divides the resolution, e.g. 8",
    ),
    (
        "bucket max side below a subject's own resolution",
        "[train]\nbuckets = true\nbucket_max_side = 512\n[subjects.toy.train]\nresolution = 768\n",
        "train.bucket_max_side: 512 is below subjects.toy.train.resolution = 768 (line {line}) - use at least 768",
    ),
    (
        "buckets not a bool",
        "[train]\nbuckets = 1\n",
        "train.buckets: expected true or false, got int 1 (line {line}) - e.g. buckets = true",
    ),
    (
        "resolution in [train] named there",
        "[train]\nresolution = 100\n",
        "train.resolution: must be a multiple of 8, got 100 (line {line}) - e.g. resolution = 104",
    ),
    (
        "save step at the last step",
        "[train]\nsteps = 100\nsave_steps = [50, 100]\n",
        "train.save_steps: step 100 is not before the last step (steps = 100) (line {line}) - the subject's own adapter is the last step's; list earlier steps, or raise steps",
    ),
    (
        "save step at a subject's own last step",
        "[train]\nsave_steps = [50]\n[subjects.toy.train]\nsteps = 50\n",
        "train.save_steps: step 50 is not before the last step (subjects.toy.train.steps = 50) (line {line}) - the subject's own adapter is the last step's; list earlier steps, or raise steps",
    ),
    (
        "save step twice",
        "[subjects.dog.train]\nsave_steps = [50, 50]\n",
        "subjects.dog.train.save_steps: step 50 is listed twice (line {line}) - list each step once",
    ),
]


@pytest.mark.parametrize("extra, expected", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_problem_messages(folder, extra, expected):  # noqa: F811
    assert_problem_said(folder, extra, expected)


def test_a_misspelt_required_key_is_one_problem_not_two(folder):  # noqa: F811
    """`imagse = ...` was also said as the missing `images`: the one fix, said twice."""
    text = '[project]\nbase_model = "tiny-sd"\n[subjects.dog]\nimagse = "dog"\ninstance_prompt = "x"\n'
    assert problems(folder, text) == ["subjects.dog: unknown key 'imagse' (line 4) - did you mean 'images'?"]
    text = '[project]\nbase_model = "tiny-sd"\n[subjects.dog]\nflavour = "dog"\ninstance_prompt = "x"\n'
    assert [p.split(" (")[0] for p in problems(folder, text)] == [  # no key taken for it: both said
        "subjects.dog: unknown key 'flavour'",
        "subjects.dog: missing required key 'images'",
    ]


def test_a_table_with_a_problem_still_has_its_images_folder_checked(folder):  # noqa: F811
    """A typo in one key of a subject (or prior) also said its missing images folder only once the typo was
    fixed, a second run later: every problem of the file is said at once."""
    found = problems(
        folder,
        """
        [project]
        base_model = "tiny-sd"

        [priors.cat]
        class_prompt = 3
        images = "data/cats"

        [subjects.dog]
        images = "data/dgo"
        instance_promt = "a photo of sks dog"
        """,
    )
    assert "priors.cat.images: folder data/cats does not exist (line 7)" in " ".join(found)
    assert "subjects.dog.images: folder data/dgo does not exist (line 10)" in " ".join(found)
    assert len(found) == 4, found  # class_prompt, the misspelt instance_prompt, two folders


def test_names_listed_as_known_include_tables_with_problems_of_their_own(folder):  # noqa: F811
    """A reference to a name the file does not have listed the known names without those whose tables had
    a problem: "priors: none defined" beside a [priors.dog] whose class_prompt was wrong."""
    found = problems(
        folder,
        """
        [project]
        base_model = "tiny-sd"

        [priors.dog]
        class_prompt = 3

        [subjects.dog]
        images = "data/dog"
        instance_prompt = "a photo of sks dog"
        prior = "dgo"

        [subjects.toy]
        images = "data/toy"
        instance_prompt = 4

        [blends.mix]
        adapters = { dgo = 1.0 }

        [renders.park]
        adapter = "dog"
        prompts = "a photo"

        [evals.park]
        render = "prak"
        """,
    )
    said = "\n".join(found)
    assert "subjects.dog.prior: 'dgo' is not a prior (line 11) - priors: dog\n" in said + "\n"
    assert "evals.park.render: 'prak' is not a render (line 25) - renders: park\n" in said + "\n"
    assert "blends.mix.adapters.dgo: 'dgo' is not a subject or blend (line 18) - subjects: dog, toy" in said


def test_a_table_with_a_problem_still_has_its_references_checked(folder):  # noqa: F811
    """A render whose prompts had a problem said nothing of its adapter that no table has, until the prompts
    were fixed: a second run for a second problem. The same for a subject's prior, a blend's parents and an
    eval's render and subject."""
    found = problems(
        folder,
        """
        [project]
        base_model = "tiny-sd"

        [subjects.dog]
        images = "data/dog"
        instance_prompt = 1
        prior = "dgo"

        [blends.mix]
        adapters = { dgo = 1.0 }
        method = "cta"

        [renders.park]
        adapter = "dgo"
        prompts = "a photo"

        [renders.grid]
        adapters = ["dog", "mxi"]
        prompts = "a photo"

        [evals.park]
        render = "prak"
        subject = "dgo"
        identifier = 3
        """,
    )
    keys = [problem.split(": ")[0] for problem in found]
    for key in (
        "subjects.dog.prior",
        "blends.mix.adapters.dgo",
        "renders.park.adapter",
        "renders.grid.adapters",
        "evals.park.render",
        "evals.park.subject",
    ):
        assert key in keys, found
    assert "renders.grid.adapters: 'mxi' is not a subject or blend (line 19)" in "\n".join(found)
