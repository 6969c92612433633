"""Project files: every problem class gives an exact, located message; good files resolve."""

from __future__ import annotations

import shutil
import textwrap

import pytest

from runner.project import ProjectError, load_project
from tests.conftest import write_image

GOOD = """
[project]
base_model = "tiny-sd"

[priors.dog]
class_prompt = "a photo of dog"

[subjects.dog]
images = "data/dog"
instance_prompt = "a photo of sks dog"
prior = "dog"

[subjects.toy]
images = "data/toy"
instance_prompt = "a toy"

[blends.mix]
adapters = { toy = 1.0, dog = 1.05 }

[renders.park]
adapter = "mix"
prompts = ["sks dog in a park"]
"""


@pytest.fixture
def folder(tmp_path):
    write_image(tmp_path / "data/dog/00.png")
    write_image(tmp_path / "data/toy/00.png")
    return tmp_path


def problems(folder, text: str) -> list[str]:
    path = folder / "p.toml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ProjectError) as info:
        load_project(path)
    assert info.value.report().startswith(f"{path}: ") or "p.toml:" in info.value.report()
    return [str(p) for p in info.value.problems]


def problem_keys(folder, text: str) -> list[str]:
    """The keys of the file's problems, in the order they are said."""
    return [p.split(":")[0] for p in problems(folder, text)]


def test_good_project_resolves_defaults_and_overrides(folder):
    path = folder / "p.toml"
    path.write_text(
        GOOD + "\n[train]\nsteps = 10\n[subjects.dog.train]\nsteps = 20\n[subjects.dog.lora]\nrank = 8\n"
    )
    project = load_project(path)
    assert project.name == "p"
    assert project.out == folder / "build" / "p"
    dog, toy = project.subjects["dog"], project.subjects["toy"]
    assert dog.train.steps == 20 and toy.train.steps == 10
    assert dog.lora.rank == 8 and toy.lora.rank == 16 and dog.lora.alpha == 27
    assert dog.images == str(folder / "data" / "dog")
    assert project.blends["mix"].adapters == (("toy", 1.0), ("dog", 1.05))
    assert project.renders["park"].seeds == [0]


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
    ("below minimum", "[lora]\nrank = 0\n", "lora.rank: must be at least 1, got 0 (line {line})"),
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
        "blends.t.svd_clamp: must be at most 1, got 5.0 (line {line})",
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
        "renders.r.width: must be a multiple of 8, got 100 (line {line})",
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
        "renders.r.seeds: must be at most 9223372036854775807, got 18446744073709551616 (line {line})",
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
        "train.resolution: must be a multiple of 8, got 100 (line {line})",
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
    # The example a type error gives passes the key's own checks.
    (
        "a number written as a string",
        '[renders.r]\nadapter = "dog"\nprompts = ["x"]\nwidth = "512"\n',
        "renders.r.width: expected an integer, got the string '512' (line {line}) - e.g. width = 512",
    ),
    (
        "a width that is not a number",
        '[renders.r]\nadapter = "dog"\nprompts = ["x"]\nwidth = "wide"\n',
        "renders.r.width: expected an integer, got the string 'wide' (line {line}) - e.g. width = 64",
    ),
    (
        "a choice that is not a string",
        '[renders.r]\nadapter = "dog"\nprompts = ["x"]\nscheduler = 1\n',
        'renders.r.scheduler: expected a string, got int 1 (line {line}) - e.g. scheduler = "ddim"',
    ),
    (
        "save steps as a string",
        '[train]\nsave_steps = "200"\n',
        "train.save_steps: expected a list of integers, got the string '200' (line {line}) - e.g. save_steps = [200]",
    ),
    (
        "one adapter where a list is expected",
        '[renders.r]\nadapters = "dog"\nprompts = ["x"]\n',
        "renders.r.adapters: expected a list of strings, got the string 'dog' (line {line}) - e.g. adapters = [\"dog\"]",
    ),
    (
        "one seed where a list is expected",
        '[renders.r]\nadapter = "dog"\nprompts = ["x"]\nseeds = 3\n',
        "renders.r.seeds: expected a list of integers, got int 3 (line {line}) - e.g. seeds = [3]",
    ),
    (
        "a list of one where a string is expected",
        '[renders.r]\nadapter = ["dog"]\nprompts = ["x"]\n',
        'renders.r.adapter: expected a string, got a list of strings (line {line}) - e.g. adapter = "dog"',
    ),
    (
        "a whole number written as a float",
        "[train]\nsteps = 1e3\n",
        "train.steps: expected an integer, got float 1000.0 (line {line}) - e.g. steps = 1000",
    ),
    (
        "a named table written as an array of tables",
        '[[renders.r2]]\nadapter = "dog"\nprompts = ["x"]\n',
        "renders.r2: expected a table, got a list of tables (line {line}) - write it as [renders.r2]",
    ),
    (
        "tables written as an array of tables",
        '[[evals]]\nrender = "park"\n',
        "evals: expected tables [evals.<name>], got a list of tables (line {line}) - name each in its header, "
        "e.g. [evals.dog] in place of [[evals]]",
    ),
    (
        "a look-alike letter in a key",
        "[train]\nst\u0435ps = 5\n",
        "invalid TOML: Expected '=' after a key in a key/value pair at column 3 (line {line}) - column 3 holds "
        "U+0435 (CYRILLIC SMALL LETTER IE), which TOML does not take there: type it again in plain ASCII",
    ),
    (
        "a no-break space pasted before a key",
        "[train]\n\u00a0steps = 5\n",
        "invalid TOML: Invalid statement at column 1 (line {line}) - column 1 holds U+00A0 (NO-BREAK SPACE), which "
        "an editor does not show: delete it",
    ),
    (
        "a date where a number is expected",
        "[train]\nsteps = 2024-01-02\n",
        "train.steps: expected an integer, got the date 2024-01-02 (line {line}) - e.g. steps = 800",
    ),
    (
        "a whole number beyond 64 bits written as a float",
        "[lora]\nrank = 1e300\n",
        "lora.rank: expected an integer, got float 1e+300 (line {line}) - e.g. rank = 16",
    ),
    (
        "a long string where a number is expected",
        f'[train]\nsteps = "{"x" * 70}"\n',
        f"train.steps: expected an integer, got the string '{'x' * 60}'... (70 characters) (line {{line}}) "
        "- e.g. steps = 800",
    ),
    (
        "seeds of two kinds",
        '[renders.r]\nadapter = "dog"\nprompts = ["x"]\nseeds = [0, "1"]\n',
        "renders.r.seeds: expected a list of integers, got a list of integers and strings (line {line}) "
        "- e.g. seeds = [0]",
    ),
    (
        "keys of a prior without its name",
        '[priors]\nclass_prompt = "a photo of cat"\nnum_images = 4\n',
        "priors.class_prompt: [priors] holds one table per name, not keys: class_prompt, num_images (line {line}) "
        "- name the table in its header, e.g. [priors.dog] in place of [priors]",
    ),
    (
        "save step zero",
        "[train]\nsave_steps = [0]\n",
        "train.save_steps: must be at least 1, got 0 (line {line})",
    ),
    (
        "unknown log",
        '[train]\nlog = "wandb"\n',
        "train.log: 'wandb' is not one of tensorboard (line {line})",
    ),
    (
        "gradient_checkpointing neither a bool nor auto",
        '[train]\ngradient_checkpointing = "yes"\n',
        "train.gradient_checkpointing: expected true, false or \"auto\", got the string 'yes' (line {line}) "
        '- e.g. gradient_checkpointing = "auto"',
    ),
    (
        "compile neither a bool nor auto",
        "[train]\ncompile = 1\n",
        'train.compile: expected true, false or "auto", got int 1 (line {line}) - e.g. compile = "auto"',
    ),
    (
        "caption dropout above 1",
        "[train]\ncaption_dropout = 1.5\n",
        "train.caption_dropout: must be at most 1, got 1.5 (line {line})",
    ),
    # LoRA variants and targets.
    (
        "use_dora not a bool",
        "[lora]\nuse_dora = 1\n",
        "lora.use_dora: expected true or false, got int 1 (line {line}) - e.g. use_dora = true",
    ),
    (
        "use_rslora not a bool",
        '[subjects.dog.lora]\nuse_rslora = "yes"\n',
        "subjects.dog.lora.use_rslora: expected true or false, got the string 'yes' (line {line}) - e.g. use_rslora = true",
    ),
    (
        "text_encoder_use_dora not a bool",
        "[lora]\ntext_encoder_use_dora = 0\n",
        "lora.text_encoder_use_dora: expected true or false, got int 0 (line {line}) - e.g. text_encoder_use_dora = true",
    ),
    (
        "text_encoder_use_rslora not a bool",
        "[lora]\ntext_encoder_use_rslora = []\n",
        "lora.text_encoder_use_rslora: expected true or false, got an empty list (line {line}) - e.g. text_encoder_use_rslora = true",
    ),
    (
        "text_encoder_2_use_dora on SD 1.x",
        "[lora]\ntext_encoder_2_use_dora = true\n",
        "lora.text_encoder_2_use_dora: text_encoder_2_use_dora configures the text_encoder_2 of sdxl models; base model tiny-sd is sd1, which has no text_encoder_2 (line {line}) - remove text_encoder_2_use_dora, or use an sdxl base model",
    ),
    (
        "text_encoder_2_use_rslora on SD 1.x",
        "[subjects.dog.lora]\ntext_encoder_2_use_rslora = true\n",
        "subjects.dog.lora.text_encoder_2_use_rslora: text_encoder_2_use_rslora configures the text_encoder_2 of sdxl models; base model tiny-sd is sd1, which has no text_encoder_2 (line {line}) - remove text_encoder_2_use_rslora, or use an sdxl base model",
    ),
    (
        "unknown target preset",
        '[lora]\ntarget_modules = "all_linear"\n',
        'lora.target_modules: \'all_linear\' is not a preset (qv, attention, all-linear) (line {line}) - did you mean \'all-linear\'? or give a list of module names, e.g. target_modules = ["to_q", "to_v", "query", "value"]',
    ),
    (
        "unknown text encoder target preset",
        '[subjects.toy.lora]\ntext_encoder_target_modules = "mlp"\n',
        'subjects.toy.lora.text_encoder_target_modules: \'mlp\' is not a preset (qv, attention, all-linear) (line {line}) - give a list of module names, e.g. text_encoder_target_modules = ["q_proj", "v_proj"]',
    ),
    (
        "targets neither a list nor a preset",
        "[lora]\ntarget_modules = 3\n",
        'lora.target_modules: expected a list of module names, or a preset, got int 3 (line {line}) - e.g. target_modules = "attention"',
    ),
    (
        "DoRA adapter in a blend",
        "[subjects.dog.lora]\nuse_dora = true\n",
        "blends.mix.adapters.dog: 'dog' is a DoRA adapter (lora.use_dora = true), which no blend method combines exactly: DoRA rescales every weight row, so its change is not a sum of low-rank deltas (line {line}) - blend LoRA or rsLoRA adapters, or render 'dog' on its own",
    ),
    (
        "text encoder DoRA adapter in a blend",
        "[subjects.toy.lora]\ntext_encoder_use_dora = true\n",
        "blends.mix.adapters.toy: 'toy' is a DoRA adapter (lora.text_encoder_use_dora = true), which no blend method combines exactly: DoRA rescales every weight row, so its change is not a sum of low-rank deltas (line {line}) - blend LoRA or rsLoRA adapters, or render 'toy' on its own",
    ),
    (
        "a bias-trained adapter in a blend",
        '[subjects.toy.lora]\nbias = "lora_only"\n',
        "blends.mix.adapters.toy: 'toy' is trained with biases (lora.bias = \"lora_only\"), which PEFT blends with no other adapter: a trained bias is no low-rank delta (line {line}) - blend adapters trained with bias = \"none\", or render 'toy' on its own",
    ),
    (
        "adam_epsilon zero",  # every LoRA trained so failed at its first step, the loss nan
        "[subjects.toy.train]\nadam_epsilon = 0.0\n",
        "subjects.toy.train.adam_epsilon: must be greater than 0, got 0.0 (line {line}) - 1e-08 is usual; with 0, "
        "the first step divides 0 by 0 and the loss becomes nan",
    ),
    # Loss and noise.
    (
        "snr_gamma zero",
        "[train]\nsnr_gamma = 0\n",
        "train.snr_gamma: must be greater than 0, got 0.0 (line {line}) - 5.0 is usual; leave snr_gamma out to weight every timestep alike",
    ),
    (
        "snr_gamma negative",
        "[subjects.dog.train]\nsnr_gamma = -5\n",
        "subjects.dog.train.snr_gamma: must be at least 0, got -5.0 (line {line})",
    ),
    (
        "noise_offset negative",
        "[train]\nnoise_offset = -0.1\n",
        "train.noise_offset: must be at least 0, got -0.1 (line {line})",
    ),
    (
        "noise_offset not a number",
        '[train]\nnoise_offset = "small"\n',
        "train.noise_offset: expected a number, got the string 'small' (line {line}) - e.g. noise_offset = 0.0",
    ),
    # Numbers TOML reads but no lockfile holds.
    (
        "nan learning rate",
        "[train]\nlearning_rate = nan\n",
        "train.learning_rate: must be a finite number, got nan (line {line}) - e.g. learning_rate = 0.0001",
    ),
    (
        "infinite guidance",
        '[renders.r]\nadapter = "dog"\nprompts = ["x"]\nguidance_scale = inf\n',
        "renders.r.guidance_scale: must be a finite number, got inf (line {line}) - e.g. guidance_scale = 7.5",
    ),
    (
        "nan blend weight",
        "[blends.b]\nadapters = { dog = 1.0, toy = nan }\n",
        "blends.b.adapters: the weight of toy must be a finite number, got nan (line {line}) - e.g. adapters = {{ dog = 1.0 }}",
    ),
    (
        "steps beyond 64 bits",
        "[subjects.dog.train]\nsteps = 99999999999999999999\n",
        "subjects.dog.train.steps: must fit in 64 bits, got 99999999999999999999 (line {line}) - e.g. steps = 800",
    ),
    (
        "a snapshot step beyond 64 bits",
        "[train]\nsave_steps = [5, 99999999999999999999]\n",
        "train.save_steps: must fit in 64 bits, got 99999999999999999999 (line {line}) - e.g. save_steps = [1, 2]",
    ),
    # Optimizers.
    (
        "unknown optimizer",
        '[train]\noptimizer = "prodigi"\n',
        "train.optimizer: 'prodigi' is not one of adamw, adamw8bit, prodigy (line {line}) - did you mean 'prodigy'?",
    ),
    (
        "prodigy key without prodigy",
        "[train]\nprodigy_d_coef = 2.0\n",
        'train.prodigy_d_coef: applies to optimizer = "prodigy" only, and the optimizer is "adamw" (line {line}) - set optimizer = "prodigy", or remove prodigy_d_coef',
    ),
    (
        "a subject's prodigy key without prodigy",
        '[train]\noptimizer = "prodigy"\nlearning_rate = 1.0\n[subjects.toy.train]\noptimizer = "adamw"\nprodigy_safeguard_warmup = true\n',
        'subjects.toy.train.prodigy_safeguard_warmup: applies to optimizer = "prodigy" only, and the optimizer is "adamw" (line {line}) - set optimizer = "prodigy", or remove prodigy_safeguard_warmup',
    ),
    (
        "a [train] prodigy key beside a subject's own optimizer",
        '[train]\noptimizer = "prodigy"\nlearning_rate = 1.0\nprodigy_d_coef = 2.0\n[subjects.toy.train]\n'
        'optimizer = "adamw"\n',
        'train.prodigy_d_coef: applies to optimizer = "prodigy" only, and the optimizer is "adamw" '
        '(subjects.toy.train.optimizer) (line {line}) - set optimizer = "prodigy", or remove prodigy_d_coef',
    ),
    (
        "[train] 8-bit Adam beside a subject's Prodigy",
        '[train]\nuse_8bit_adam = true\n[subjects.toy.train]\noptimizer = "prodigy"\nlearning_rate = 1.0\n',
        'train.use_8bit_adam: asks for 8-bit AdamW, but the optimizer is "prodigy" (subjects.toy.train.optimizer) '
        "(line {line}) - remove use_8bit_adam",
    ),
    (
        "prodigy bias correction without prodigy",
        '[train]\noptimizer = "adamw8bit"\nprodigy_use_bias_correction = true\n',
        'train.prodigy_use_bias_correction: applies to optimizer = "prodigy" only, and the optimizer is "adamw8bit" (line {line}) - set optimizer = "prodigy", or remove prodigy_use_bias_correction',
    ),
    (
        "prodigy_d_coef zero",
        '[train]\noptimizer = "prodigy"\nprodigy_d_coef = 0\n',
        "train.prodigy_d_coef: must be greater than 0, got 0.0 (line {line}) - 1.0 is Prodigy's default; 0.5 to 2 are usual",
    ),
    (
        "prodigy_beta3 above 1",
        '[train]\noptimizer = "prodigy"\nprodigy_beta3 = 1.5\n',
        "train.prodigy_beta3: must be at most 1, got 1.5 (line {line})",
    ),
    (
        "prodigy_use_bias_correction not a bool",
        '[train]\noptimizer = "prodigy"\nprodigy_use_bias_correction = "yes"\n',
        "train.prodigy_use_bias_correction: expected true or false, got the string 'yes' (line {line}) - e.g. prodigy_use_bias_correction = true",
    ),
    (
        "prodigy with 8-bit Adam",
        '[train]\noptimizer = "prodigy"\nuse_8bit_adam = true\n',
        'train.use_8bit_adam: asks for 8-bit AdamW, but the optimizer is "prodigy" (line {line}) - remove use_8bit_adam',
    ),
    (
        "prodigy with two learning rates",
        '[train]\noptimizer = "prodigy"\nlearning_rate = 1.0\ntext_encoder_learning_rate = 0.5\n',
        "train.text_encoder_learning_rate: Prodigy takes one learning rate for every component (or 0, which freezes one); got 0.5 beside learning_rate 1.0 (line {line}) - remove text_encoder_learning_rate: Prodigy finds the step size itself",
    ),
    # Values the optimizer or the LoRA layers refuse only once the train step has loaded the model.
    (
        "adam_beta1 of 1",
        "[train]\nadam_beta1 = 1.0\n",
        "train.adam_beta1: must be below 1, got 1.0 (line {line}) - 0.9 and 0.999 are usual",
    ),
    (
        "prodigy adam_beta2 above 1",
        '[train]\noptimizer = "prodigy"\nadam_beta2 = 1.5\n',
        "train.adam_beta2: must be below 1, got 1.5 (line {line}) - 0.9 and 0.999 are usual",
    ),
    (
        "lora dropout above 1",
        "[lora]\ndropout = 1.5\n",
        "lora.dropout: must be at most 1, got 1.5 (line {line})",
    ),
    (
        "text encoder dropout above 1",
        "[lora]\ntext_encoder_dropout = 2\n",
        "lora.text_encoder_dropout: must be at most 1, got 2.0 (line {line})",
    ),
]


def test_an_output_folder_inside_an_image_folder_is_a_problem(folder):
    """Outputs there would be read back as training images: every build would retrain on its renders."""
    inside = GOOD.replace('base_model = "tiny-sd"', 'base_model = "tiny-sd"\nout = "data/dog/out"')
    assert problems(folder, inside) == [
        "project.out: the output folder data/dog/out is inside the image folder of subjects.dog (line 4) "
        "- the next build would train on the images of its priors and renders; put the outputs elsewhere, e.g. "
        'out = "build/p"'
    ]
    (folder / "data/dog/00.png").rename(folder / "00.png")
    here = GOOD.replace('images = "data/dog"', 'images = "."')
    assert problems(folder, here) == [
        "subjects.dog.images: the output folder build/p is inside the image folder of subjects.dog (line 9) "
        "- the next build would train on the images of its priors and renders; put the outputs elsewhere, e.g. "
        'out = "../build/p"'
    ]
    beside = GOOD.replace('base_model = "tiny-sd"', 'base_model = "tiny-sd"\nout = "."')
    load_project(_write(folder, beside.replace('images = "data/dog"', 'images = "data/toy"')))
    # Adapters alone write no images there: valid, as it was.
    adapters_only = here.split("[priors.dog]")[0] + here.split('class_prompt = "a photo of dog"\n')[1]
    adapters_only = adapters_only.split("[renders.park]")[0].replace('prior = "dog"\n', "")
    assert load_project(_write(folder, adapters_only)).subjects["dog"].images == str(folder)


def _write(folder, text: str):
    path = folder / "p.toml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("extra, expected", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_problem_messages(folder, extra, expected):
    if extra is None:
        text = GOOD.replace('base_model = "tiny-sd"', 'base_model = "model.ckpt"')
    else:
        text = GOOD + "\n" + extra
    # The line of the offending key: the last line of `extra` that mentions it, counted in the file.
    found = problems(folder, text)
    lines = textwrap.dedent(text).splitlines()
    for n in range(len(lines), 0, -1):
        candidate = expected.format(line=n, folder=folder)
        if candidate in found:
            break
    else:
        raise AssertionError(f"{expected!r} not in {found!r}")


def test_a_blend_component_of_one_parent_keeps_that_parent_s_rank(folder):
    # Only dog trains a text encoder: PEFT copies its LoRA into the svd blend at its own rank (4), not at
    # svd_rank (16), so a linear blend of that blend with dog has equal ranks everywhere.
    text = GOOD + textwrap.dedent(
        """
        [subjects.dog.lora]
        text_encoder_rank = 4
        [subjects.toy.train]
        train_text_encoder = false
        [subjects.toy.lora]
        rank = 8
        [blends.s]
        adapters = { dog = 1.0, toy = 0.5 }
        method = "svd"
        svd_rank = 16
        [blends.lin]
        adapters = { s = 1.0, dog = 0.5 }
        method = "linear"
        """
    )
    assert list(load_project(_write(folder, text)).blends) == ["mix", "s", "lin"]


def test_a_render_lists_several_adapters(folder):
    path = folder / "p.toml"
    path.write_text(GOOD + '\n[renders.grid]\nadapters = ["dog", "mix", "none"]\nprompts = ["x"]\n')
    project = load_project(path)
    assert project.renders["grid"].adapter is None
    assert project.renders["grid"].adapter_names == ["dog", "mix", "none"]
    assert project.renders["park"].adapter_names == ["mix"]


def test_render_adapter_problems_name_their_line(folder):
    text = GOOD + '\n[renders.r]\nadapter = "dog"\nadapters = ["dog", "cat"]\nprompts = ["x"]\n'
    line = textwrap.dedent(text).splitlines().index('adapters = ["dog", "cat"]') + 1
    assert problems(folder, text) == [
        f"renders.r.adapters: adapter and adapters are both given (line {line}) - keep adapter for one "
        "adapter, or adapters for one grid column per adapter",
        f"renders.r.adapters: 'cat' is not a subject or blend (line {line}) - subjects: dog, toy; "
        "blends: mix; or 'none'",
    ]
    text = GOOD + '\n[renders.r]\nprompts = ["x"]\n'
    header = textwrap.dedent(text).splitlines().index("[renders.r]") + 1
    assert problems(folder, text)[0].startswith(
        f"renders.r: missing required key 'adapter' or 'adapters' (line {header})"
    )


def test_every_problem_is_reported_at_once(folder):
    text = GOOD + "\n[train]\nstepz = 3\nresolution = 'big'\n[renders.r]\nadapter = 'cat'\nprompts = ['x']\n"
    found = problems(folder, text)
    assert len(found) == 3
    assert (
        any("stepz" in p for p in found)
        and any("resolution" in p for p in found)
        and any("'cat'" in p for p in found)
    )


def test_a_prior_with_a_problem_is_not_also_missing_for_its_subjects(folder):
    text = GOOD.replace('class_prompt = "a photo of dog"', 'class_prompt = "a photo of dog"\nnum_imgs = 3')
    line = textwrap.dedent(text).splitlines().index("num_imgs = 3") + 1
    assert problems(folder, text) == [
        f"priors.dog: unknown key 'num_imgs' (line {line}) - did you mean 'num_images'?"
    ]


@pytest.mark.parametrize(
    "broken, extra",
    [
        ('instance_prompt = "a photo of sks dog"', ""),  # the subject misses its prompt
        ('prior = "dog"', 'prior = "dog"\nrnak = 4'),  # a key it does not know
        ("[renders.park]", "[renders.park]\nwidht = 64"),
        ("adapters = { toy = 1.0, dog = 1.05 }", 'adapters = { toy = 1.0, dog = 1.05 }\nmethod = "lin"'),
    ],
    ids=["subject", "subject key", "render", "blend"],
)
def test_a_table_with_a_problem_is_not_also_missing_where_it_is_named(folder, broken, extra):
    text = GOOD.replace(broken, extra) + textwrap.dedent(
        """
        [subjects.dog.train]
        save_steps = [2]
        [blends.mix2]
        adapters = { mix = 1.0, dog = 1.0 }
        [renders.grid]
        adapters = ["dog", "dog@2", "mix"]
        prompts = ["x"]
        [evals.e]
        render = "park"
        subject = "dog"
        identifier = "sks"
        """
    )
    found = problems(folder, text)
    assert len(found) == 1, found


def test_snapshots_of_a_subject_whose_train_table_has_a_problem_are_not_also_missing(folder):
    text = (
        GOOD
        + '\n[subjects.dog.train]\nsave_steps = [2]\nstepz = 4\n[renders.r]\nadapter = "dog@2"\nprompts = ["x"]\n'
    )
    assert problem_keys(folder, text) == ["subjects.dog.train"]


def test_a_subject_whose_lora_table_has_a_problem_is_not_also_unblendable(folder):
    # [lora] would make dog a rank-16 DoRA adapter, beside toy's rank 8: neither is what its own table says.
    own = "\n[subjects.{}.lora]\nrank = 8\nuse_dora = false\n"
    text = (
        GOOD
        + '\n[lora]\nuse_dora = true\n[blends.mix2]\nadapters = { mix = 1.0, toy = 1.0 }\nmethod = "linear"\n'
    )
    text += own.format("dog") + "rnak = 4\n" + own.format("toy")
    assert problem_keys(folder, text) == ["subjects.dog.lora"]


def test_a_train_table_with_a_problem_does_not_make_problems_of_a_subject_s_own_train_keys(folder):
    # Without [train], dog's keys were checked against the defaults (steps 800, resolution 512).
    text = GOOD + textwrap.dedent(
        """
        [train]
        steps = 1000
        resolution = 1024
        stepz = 3
        [subjects.dog.train]
        save_steps = [900]
        bucket_min_side = 768
        """
    )
    assert problem_keys(folder, text) == ["train"]


def test_a_table_with_a_bad_name_is_not_also_missing_where_it_is_named(folder):
    text = (
        GOOD
        + '\n[subjects."my toy"]\nimages = "data/toy"\ninstance_prompt = "x"\n[renders.r]\nadapter = "my toy"\nprompts = ["x"]\n'
    )
    assert problem_keys(folder, text) == ["subjects.my toy"]


def test_a_size_off_the_grid_is_reported_beside_its_table_s_other_problems(folder):
    text = GOOD + '\n[renders.r]\nadapter = "dog"\nprompts = ["x"]\nwidth = 60\nheight = 0\n'
    found = problems(folder, text)
    assert any(p.startswith("renders.r.width: must be a multiple of 8, got 60") for p in found), found
    assert any(p.startswith("renders.r.height: must be at least 8, got 0") for p in found), found


def test_invalid_toml_names_the_line(folder):
    found = problems(folder, "[project]\nbase_model = \n")
    assert found == ["invalid TOML: Invalid value at column 14 (line 2) - fix the syntax"]


@pytest.mark.parametrize(
    "theirs",
    ['negative_prompt = "blurry"', "steps = 30"],  # another key on the other side, or the same one changed
)
def test_a_merge_conflict_left_in_the_project_file_is_named_with_its_fix(folder, theirs):
    # `git merge` of two branches that changed the same lines leaves both sides between git's markers.
    render = '\n[renders.r]\nadapter = "dog"\nprompts = ["x"]\n<<<<<<< HEAD\nsteps = 20\n=======\n'
    found = problems(folder, GOOD + render + theirs + "\n>>>>>>> theirs\n")
    assert found == [
        "unresolved merge conflict: `<<<<<<< HEAD` (line 27) - keep the lines you want, "
        "then delete git's marker lines (<<<<<<<, =======, >>>>>>>)"
    ]


def test_a_separator_in_a_multi_line_string_is_no_merge_conflict(folder):
    text = GOOD + '\n[renders.r]\nadapter = "dog"\nprompts = ["""a dog\n=======\n"""]\nsteps = \n'
    assert problems(folder, text) == ["invalid TOML: Invalid value at column 9 (line 29) - fix the syntax"]


def test_missing_file(tmp_path):
    with pytest.raises(ProjectError, match="no such project file"):
        load_project(tmp_path / "nope.toml")


def test_a_folder_is_no_project_file_and_its_project_files_are_named(tmp_path):
    with pytest.raises(ProjectError, match="a folder, not a project file - run `dbl init` in it"):
        load_project(tmp_path)
    (tmp_path / "b.toml").write_text("")
    (tmp_path / "a.toml").write_text("")
    with pytest.raises(ProjectError, match="a folder, not a project file - name one of: a.toml, b.toml"):
        load_project(tmp_path)


def test_report_format(folder):
    path = folder / "p.toml"
    path.write_text(GOOD + "\n[subjects.dog.lora]\nrnak = 3\n")
    with pytest.raises(ProjectError) as info:
        load_project(path)
    report = info.value.report().splitlines()
    assert report[0].endswith("p.toml: 1 problem")
    assert report[1] == "  subjects.dog.lora: unknown key 'rnak' (line 25) - did you mean 'rank'?"


def test_empty_images_folder(folder):
    (folder / "data/empty").mkdir()
    (folder / "data/empty/notes.txt").write_text("no photos yet")
    found = problems(folder, GOOD + "\n[subjects.cat]\nimages = 'data/empty'\ninstance_prompt = 'x'\n")
    assert found == [
        "subjects.cat.images: folder data/empty holds no images (.jpg, .png, .webp ...) (line 25) - add a few photos of the subject"
    ]


def test_a_folder_of_pictures_dbl_does_not_read_says_what_it_holds(folder):
    (folder / "data/phone").mkdir()
    for name in ["IMG_1.HEIC", "IMG_2.HEIC", "IMG_3.HEIC", "IMG_4.heic"]:
        (folder / "data/phone" / name).write_bytes(b"not decoded")
    (folder / "data/linked").mkdir()
    (folder / "data/linked/dog").symlink_to(folder / "data/dog", target_is_directory=True)
    text = "\n[subjects.cat]\nimages = 'data/phone'\ninstance_prompt = 'x'\n"
    found = problems(folder, GOOD + text + text.replace("cat", "fox").replace("phone", "linked"))
    assert found == [
        "subjects.cat.images: folder data/phone holds no images (.jpg, .png, .webp ...), only IMG_1.HEIC, "
        "IMG_2.HEIC, IMG_3.HEIC and 1 more (line 25) - convert them to .jpg or .png",
        "subjects.fox.images: folder data/linked holds no images (.jpg, .png, .webp ...), only symbolic links to "
        "folders, which dbl does not follow: dog (line 29) - copy their images in, or name the folder they "
        "link to",
    ]


def test_a_key_set_twice_is_named_with_both_lines(folder):
    found = problems(folder, GOOD + '\n[renders.r]\nadapter = "dog"\nprompts = ["x"]\nprompts = ["y"]\n')
    assert found == ["renders.r.prompts: set twice, first on line 26 (line 27) - keep one of them"]


def test_a_table_defined_twice_is_named(folder):
    found = problems(folder, GOOD + "\n[renders.park]\nseeds = [1]\n")
    assert found == ["renders.park: set twice, first on line 20 (line 24) - keep one of them"]


def _single_file(path, keys):
    """A .safetensors file whose header names `keys` (one float each): what family detection reads."""
    import json
    import struct

    header = {
        k: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i, k in enumerate(keys)
    }
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"\0" * (4 * len(keys)))
    return path


SD1_KEYS = ["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.x"]


@pytest.mark.parametrize(
    "base, config, index, expected",
    [
        (
            "tiny-sd",
            "cfg",
            {"_class_name": "StableDiffusionPipeline"},
            "project.base_model_config: applies to a single-file base_model only; 'tiny-sd' is a built-in "
            "model, which has its own configs (line 4) - remove base_model_config",
        ),
        (
            "model.safetensors",
            "./nope",
            None,
            "project.base_model_config: no such folder: {folder}/nope (line 4) - give the diffusers folder that "
            "holds model_index.json, unet/, text_encoder/ ..., or a hub id",
        ),
        (
            "model.safetensors",
            "cfg",
            None,
            "project.base_model_config: {folder}/cfg is not a diffusers folder (it has no model_index.json) "
            "(line 4) - give the diffusers folder that holds model_index.json, unet/, text_encoder/ ..., or a hub id",
        ),
        (
            "model.safetensors",
            "cfg",
            {"_class_name": "StableDiffusionXLPipeline"},
            "project.base_model_config: {folder}/cfg describes a sdxl model, but base_model "
            "{folder}/model.safetensors is sd1 (line 4) - give the diffusers folder of a sd1 model",
        ),
    ],
    ids=["not a single file", "no such folder", "not a diffusers folder", "another family"],
)
def test_base_model_config_problems(folder, base, config, index, expected):
    import json

    _single_file(folder / "model.safetensors", SD1_KEYS)
    (folder / "cfg").mkdir()
    if index is not None:
        (folder / "cfg" / "model_index.json").write_text(json.dumps(index))
    text = GOOD.replace('base_model = "tiny-sd"', f'base_model = "{base}"\nbase_model_config = "{config}"')
    assert problems(folder, text) == [expected.format(folder=folder)]


@pytest.mark.parametrize(
    "base, kind", [("tiny-sd", "a built-in model"), ("model.safetensors", "a single-file checkpoint")]
)
def test_a_revision_of_a_base_model_not_on_the_hub_loads_with_a_warning_naming_its_line(folder, base, kind):
    # Was ignored without a word: the revision names a commit of a hub model, and no other has one.
    _single_file(folder / "model.safetensors", SD1_KEYS)
    path = folder / "p.toml"
    path.write_text(GOOD.replace('base_model = "tiny-sd"', f'base_model = "{base}"\nrevision = "v2"'))
    with pytest.warns(UserWarning) as warned:
        project = load_project(path)  # a project built with it must still load
    assert [str(w.message) for w in warned] == [
        f"{path}: project.revision: applies to a hub base_model only; '{base}' is {kind}: it is ignored "
        "(line 4) - remove revision (nothing rebuilds)"
    ]
    assert project.settings.revision == "v2"


def test_a_revision_of_a_hub_model_loads_without_a_word(folder):
    import warnings

    path = folder / "p.toml"
    path.write_text(GOOD.replace('base_model = "tiny-sd"', 'base_model = "owner/model"\nrevision = "v2"'))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_project(path).settings.revision == "v2"


def test_base_model_config_of_a_single_file_resolves_to_its_folder(folder):
    import json

    from runner.models import BaseModel

    _single_file(folder / "model.safetensors", SD1_KEYS)
    (folder / "cfg").mkdir()
    (folder / "cfg" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    path = folder / "p.toml"
    path.write_text(GOOD.replace('"tiny-sd"', '"model.safetensors"\nbase_model_config = "cfg"'))
    project = load_project(path)
    base = BaseModel.of(project.settings, project.dir)
    assert (base.kind, base.config) == ("file", str(folder / "cfg"))
    path.write_text(
        GOOD.replace('"tiny-sd"', '"model.safetensors"\nbase_model_config = "owner/sd15-configs"')
    )
    assert BaseModel.of(load_project(path).settings, folder).config == "owner/sd15-configs"


@pytest.mark.parametrize(
    "keys, kind",
    [
        (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "text_encoders.clip_l.x"], "SD3"),
        (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "Flux"),
    ],
)
def test_a_single_file_of_another_family_is_a_project_file_error(folder, keys, kind):
    _single_file(folder / "model.safetensors", keys)
    found = problems(folder, GOOD.replace('"tiny-sd"', '"model.safetensors"'))
    assert found == [
        f"project.base_model: base model {folder}/model.safetensors is a {kind} checkpoint; this model family "
        "is not supported yet (supported: sd1, sdxl, i.e. Stable Diffusion 1.x, 2.x and SDXL) (line 3) - use a "
        "Stable Diffusion 1.x, 2.x or SDXL model"
    ]


@pytest.mark.parametrize("key", ["gradient_checkpointing", "compile", "cuda_graphs"])
@pytest.mark.parametrize(
    "written, value", [("", "auto"), ('"auto"', "auto"), ("true", True), ("false", False)]
)
def test_speed_switches_are_auto_true_or_false_and_never_fingerprinted(folder, key, written, value):
    from runner.project.fields import fingerprinted_fields

    path = folder / "p.toml"
    path.write_text(GOOD + (f"\n[train]\n{key} = {written}\n" if written else ""))
    dog = load_project(path).subjects["dog"]
    assert getattr(dog.train, key) == value
    # Not an input of the train fingerprint: a project that wrote true or false keeps its lockfile fresh.
    assert key not in fingerprinted_fields(dog.train)


def test_a_file_that_is_not_utf8_loads_as_before_with_a_warning_naming_its_line(folder):
    path = folder / "p.toml"
    path.write_bytes(GOOD.replace("a toy", "a caf\xe9 toy").encode("latin-1"))
    with pytest.warns(UserWarning, match=r"p.toml is not UTF-8 \(line 15\).*save the file as UTF-8"):
        project = load_project(path)
    assert project.tables["train"]["toy"].instance_prompt == "a caf\ufffd toy"


def test_a_prior_no_subject_uses_loads_with_a_warning_naming_its_line(folder):
    path = folder / "p.toml"
    path.write_text(GOOD + '\n[priors.cat]\nclass_prompt = "a photo of cat"\n')
    line = path.read_text().splitlines().index("[priors.cat]") + 1
    with pytest.warns(UserWarning) as said:
        assert "cat" in load_project(path).priors
    assert [str(w.message) for w in said] == [
        f'{path}: priors.cat: no subject uses this prior (line {line}) - add prior = "cat" to a subject, '
        "or remove it"
    ]


@pytest.mark.parametrize(
    "written, said",
    [
        ('" "', "is empty: the class images would have no prompt"),
        ('["a photo of dog", ""]', "prompt 1 is empty: the class images of its turn would have no prompt"),
    ],
)
def test_an_empty_class_prompt_loads_with_a_warning_naming_its_line(folder, written, said):
    path = folder / "p.toml"
    path.write_text(GOOD.replace('class_prompt = "a photo of dog"', f"class_prompt = {written}"))
    line = path.read_text().splitlines().index(f"class_prompt = {written}") + 1
    with pytest.warns(UserWarning) as warned:
        load_project(path)  # a project built with it must still load
    assert [str(w.message) for w in warned] == [
        f'{path}: priors.dog.class_prompt: {said} (line {line}) - name the class, e.g. "a photo of dog"'
    ]


def test_an_empty_instance_prompt_without_captions_loads_with_a_warning_naming_its_line(folder):
    path = folder / "p.toml"
    path.write_text(GOOD.replace('instance_prompt = "a toy"', 'instance_prompt = ""'))
    line = path.read_text().splitlines().index('instance_prompt = ""') + 1
    with pytest.warns(UserWarning) as warned:
        load_project(path)  # a project built with it must still load
    assert [str(w.message) for w in warned] == [
        f"{path}: subjects.toy.instance_prompt: is empty: the photos would train on no prompt, and no word "
        f'would call up the subject (line {line}) - give the subject a rare word, e.g. "a photo of sks toy"'
    ]
    path.write_text(
        GOOD.replace('instance_prompt = "a toy"', 'instance_prompt = ""\ncaption_extension = ".txt"')
    )
    load_project(path)  # every photo may have its caption: nothing said


def test_trigger_in_a_render_prompt_loads_with_a_warning_giving_its_words(folder):
    path = folder / "p.toml"
    text = GOOD.replace('prior = "dog"', 'prior = "dog"\ntrigger = "sks dog"')
    path.write_text(text.replace('prompts = ["sks dog in a park"]', 'prompts = ["[trigger] in a park"]'))
    line = path.read_text().splitlines().index('prompts = ["[trigger] in a park"]') + 1
    with pytest.warns(UserWarning) as warned:
        load_project(path)  # the render mixes toy and dog: the words of dog's trigger
    assert [str(w.message) for w in warned] == [
        f"{path}: renders.park.prompts: [trigger] is rendered as written: only captions and instance prompts "
        f"replace it (line {line}) - write the words it stands for, e.g. 'sks dog'"
    ]


def test_names_that_differ_only_in_case_load_with_a_warning_naming_both(folder):
    path = folder / "p.toml"
    path.write_text(GOOD + '\n[renders.Park]\nadapter = "dog"\nprompts = ["x"]\n')
    lines = path.read_text().splitlines()
    park, twin = lines.index("[renders.park]") + 1, lines.index("[renders.Park]") + 1
    with pytest.warns(UserWarning) as said:
        assert set(load_project(path).renders) == {"park", "Park"}  # a lockfile may hold both: still loads
    assert [str(w.message) for w in said] == [
        f"{path}: renders.Park: 'Park' differs only in case from renders.park, whose table is at line {park}: "
        f"on macOS and Windows, whose file names ignore case, both would write one output folder (line {twin}) "
        "- rename one of them"
    ]


def test_empty_images_loads_as_the_project_folder_with_a_warning(folder):
    path = folder / "p.toml"
    text = '[project]\nbase_model = "tiny-sd"\n[subjects.toy]\nimages = ""\ninstance_prompt = "a sks toy"\n'
    path.write_text(text)
    with pytest.warns(UserWarning) as said:
        assert load_project(path).subjects["toy"].images == str(folder)  # as it loaded before
    assert [str(w.message) for w in said] == [
        f"{path}: subjects.toy.images: is empty, which names the project file's folder and every image below "
        'it (line 4) - write images = "." if that is meant, or name the folder of the images'
    ]
    shutil.rmtree(folder / "data")  # no image below it: said as the folder '.', not ''
    assert "subjects.toy.images: folder . holds no images" in "\n".join(problems(folder, text))


def test_a_name_windows_keeps_for_a_device_loads_with_a_warning(folder):
    path = folder / "p.toml"
    path.write_text(GOOD + '\n[renders.CON]\nadapter = "dog"\nprompts = ["x"]\n')
    line = path.read_text().splitlines().index("[renders.CON]") + 1
    with pytest.warns(UserWarning) as said:
        assert "CON" in load_project(path).renders  # valid where it was built
    assert [str(w.message) for w in said] == [
        f"{path}: renders.CON: 'CON' is a device name on Windows, where no folder can have it: its outputs "
        f"could not be written there (line {line}) - rename it"
    ]


def test_a_prior_s_caption_extension_without_images_loads_with_a_warning(folder):
    path = folder / "p.toml"
    path.write_text(
        GOOD.replace(
            'class_prompt = "a photo of dog"', 'class_prompt = "a photo of dog"\ncaption_extension = ".txt"'
        )
    )
    line = path.read_text().splitlines().index('caption_extension = ".txt"') + 1
    with pytest.warns(UserWarning) as said:
        load_project(path)
    assert [str(w.message) for w in said] == [
        f"{path}: priors.dog.caption_extension: reads the captions of your own class images, and the prior has "
        f"none (line {line}) - give them with images = ..., or remove the key"
    ]


def test_a_key_at_the_wrong_level_names_the_table_it_belongs_in(folder):
    text = "steps = 5\n" + GOOD.replace('prior = "dog"', 'prior = "dog"\nrank = 4')
    text += "\n[train]\nrank = 8\n[subjects.toy.lora]\nsteps = 3\n"
    found = problems(folder, text)
    for wrong in (
        "unknown key 'steps' (line 1) - it belongs in [train]: move it there",
        "train: unknown key 'rank' (line 27) - it belongs in [lora]: move it there",
        "subjects.toy.lora: unknown key 'steps' (line 29) - it belongs in [subjects.toy.train]: move it there",
        "subjects.dog: unknown key 'rank' (line 13) - it belongs in [subjects.dog.lora]: move it there",
    ):
        assert wrong in found, found


def test_a_blend_cycle_is_one_problem_that_names_its_blends(folder):
    text = GOOD + "\n[blends.a]\nadapters = { b = 1.0 }\n[blends.b]\nadapters = { dog = 1.0, a = 1.0 }\n"
    text += "[blends.self]\nadapters = { self = 1.0 }\n"
    assert problems(folder, text) == [
        "blends.a.adapters: blend 'a' depends on itself: a -> b -> a (line 25) - remove the cycle between blends",
        "blends.self.adapters: blend 'self' depends on itself: self -> self (line 29) - remove self from its adapters",
    ]


def test_a_blend_named_like_a_subject_is_one_problem_not_a_cycle_too(folder):
    text = (
        GOOD + "\n[blends.dog]\nadapters = { dog = 1.0 }\n[blends.a]\nadapters = { dog = 1.0, mix = 1.0 }\n"
    )
    assert problems(folder, text) == [
        "blends.dog: 'dog' is both a subject and a blend (line 24) - rename one of them",
    ]


def test_an_empty_project_file_is_told_where_base_model_goes(tmp_path):
    from runner.project import ProjectError, load_project

    path = tmp_path / "p.toml"
    path.write_text("")
    with pytest.raises(ProjectError) as caught:
        load_project(path)
    assert str(caught.value.problems[0]).endswith("add base_model = ... under [project]"), (
        caught.value.report()
    )


def test_the_name_refused_for_kohya_files_is_the_diffusers_file_s():
    from runner.adapters import DIFFUSERS_WEIGHTS
    from runner.project.checks import DIFFUSERS_STEM

    assert f"{DIFFUSERS_STEM}.safetensors" == DIFFUSERS_WEIGHTS


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85"])
def test_lines_are_counted_as_toml_counts_them(folder, separator):
    # TOML ends a line at "\n" only: a prompt or comment pasted from a web page may hold a Unicode line
    # separator, and the lines after it are still numbered as an editor numbers them.
    text = GOOD.replace('"a photo of dog"', f'"a photo{separator}of dog"  # it is{separator}here')
    text += '\n[train]\nsteps = "800"\n'
    line = text.split("\n").index('steps = "800"') + 1
    assert problems(folder, text) == [
        f"train.steps: expected an integer, got the string '800' (line {line}) - e.g. steps = 800"
    ]


def test_a_value_with_a_line_break_or_terminal_code_is_said_on_one_line(folder):
    # A problem quotes the value; written as is, a line break splits the report and an escape
    # sequence recolours the terminal.
    text = GOOD + '\n[renders.r]\nadapter = "dog\\n\\u001b[31m\\u2028"\nprompts = ["x"]\n'
    path = folder / "p.toml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ProjectError) as info:
        load_project(path)
    lines = info.value.report().split("\n")
    assert len(lines) == 2 and all(line.isprintable() for line in lines)  # the head line, one problem
    assert "'dog\\n\\x1b[31m\\u2028' is not a subject or blend" in lines[1]


LONG = "x" * 300


@pytest.mark.parametrize(
    "old, new, key, message",
    [
        (
            'images = "data/dog"',
            f'images = "data/{LONG}"',
            "subjects.dog.images",
            "holds a name of 300 bytes",
        ),
        ('images = "data/dog"', f'images = "{"ab/" * 1500}"', "subjects.dog.images", "is 4500 bytes long"),
        (
            'base_model = "tiny-sd"',
            f'base_model = "{LONG}"',
            "project.base_model",
            "holds a name of 300 bytes",
        ),
        (
            'base_model = "tiny-sd"',
            f'base_model = "models/{LONG}.safetensors"',
            "project.base_model",
            "holds a name",
        ),
        (
            'prior = "dog"',
            f'prior = "dog"\ncaption_extension = ".{LONG}"',
            "subjects.dog.caption_extension",
            "holds",
        ),
        ('base_model = "tiny-sd"', f'base_model = "tiny-sd"\nout = "{LONG}"', "project.out", "holds a name"),
        (
            'class_prompt = "a photo of dog"',
            f'class_prompt = "a"\nimages = "{LONG}"',
            "priors.dog.images",
            "holds",
        ),
    ],
    ids=["images", "deep images", "hub id", "checkpoint", "caption extension", "out", "class images"],
)
def test_a_path_too_long_for_the_file_system_is_a_problem_of_its_key(folder, old, new, key, message):
    # The OS refuses to look such a path up (ENAMETOOLONG): it was an OSError and exit 1, naming no key.
    found = problems(folder, GOOD.replace(old, new))
    assert len(found) == 1 and found[0].startswith(f"{key}: {message}") and found[0].endswith("- shorten it")


def test_a_hub_id_longer_than_the_hub_allows_is_no_hub_id(folder):
    # Each part under the file system's limit, but its cache folder (models--owner--name) over it.
    hub_id = f"{'o' * 127}/{'n' * 127}"
    found = problems(folder, GOOD.replace('base_model = "tiny-sd"', f'base_model = "{hub_id}"'))
    assert found == [
        f"project.base_model: '{hub_id}' is neither a folder nor a hub id (owner/name) (line 3) - check the path or id"
    ]


@pytest.mark.parametrize(
    "old, new, key, step",
    [
        ('images = "data/dog"', 'images = "adapters/dog"', "subjects.dog.images", "train:dog"),
        (
            'class_prompt = "a photo of dog"',
            'class_prompt = "a"\nimages = "priors/dog/mine"',
            "priors.dog.images",
            "prior:dog",
        ),
    ],
    ids=["photos", "class images"],
)
def test_an_image_folder_inside_a_step_s_output_folder_is_a_problem(folder, old, new, key, step):
    # With out = "." the train step's outputs replace adapters/dog/: the photos kept there were deleted.
    shown = new.split('images = "')[1].rstrip('"')
    write_image(folder / shown / "00.png")
    text = GOOD.replace('base_model = "tiny-sd"', 'base_model = "tiny-sd"\nout = "."').replace(old, new)
    found = problems(folder, text)
    assert [p for p in found if p.startswith(key)] == [
        f"{key}: folder {shown} lies in the output folder of {step}, which its outputs replace: a build deletes "
        f"the images in it (line {textwrap.dedent(text).split(chr(10)).index(new.split(chr(10))[-1]) + 1}) - move "
        "the images to a folder of their own, or set out in [project] to another folder"
    ]


def test_an_image_folder_beside_the_outputs_is_no_problem(folder):
    write_image(folder / "adapters/mine/00.png")  # a folder no step of the project writes
    text = GOOD.replace('base_model = "tiny-sd"', 'base_model = "tiny-sd"\nout = "."')
    (folder / "p.toml").write_text(text.replace('images = "data/toy"', 'images = "adapters/mine"'))
    assert load_project(folder / "p.toml").tables["train"]["toy"].images == str(folder / "adapters/mine")


@pytest.mark.parametrize(
    "out, file, key, fix",
    [
        ('out = "notes.txt"', "notes.txt", "project.out", 'name a folder in out = "..."'),
        ('out = "notes.txt/outputs"', "notes.txt", "project.out", 'name a folder in out = "..."'),
        (None, "build", "project", 'move build away, or set out = "..." in [project]'),
    ],
    ids=["out", "inside a file", "default"],
)
def test_an_output_folder_that_cannot_be_made_is_a_problem(folder, out, file, key, fix):
    # The build ran its first step, then could not store its outputs ("Not a directory").
    (folder / file).write_text("#!/bin/sh\n")
    text = GOOD.replace('base_model = "tiny-sd"', f'base_model = "tiny-sd"\n{out}') if out else GOOD
    found = problems(folder, text)
    shown = out.split('"')[1] if out else "build/p"
    line = 4 if out else 2
    assert found == [
        f"{key}: the output folder {shown} cannot be made: {file} is a file (line {line}) - {fix}"
    ]


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_base_model_is_said_to_be_empty(folder, value):
    # Read as a path, it named the project's own folder: "<folder> is not a diffusers folder".
    found = problems(folder, GOOD.replace('base_model = "tiny-sd"', f'base_model = "{value}"'))
    assert found == [
        "project.base_model: is empty (line 3) - name the model the adapters train on: a hub id, a local diffusers "
        "folder, a single-file checkpoint or a built-in (tiny-sd, tiny-sd-v, tiny-shapes, tiny-sdxl)"
    ]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_a_project_file_in_utf16_says_to_save_it_as_utf8(folder, encoding):
    # Windows PowerShell's `>` writes UTF-16; read as UTF-8 every other byte was junk, and the problem
    # was an invalid statement at column 1.
    path = folder / "p.toml"
    path.write_bytes(GOOD.encode(encoding))
    with pytest.raises(ProjectError) as info:
        load_project(path)
    name = encoding.upper()
    assert [str(p) for p in info.value.problems] == [
        f"the file is {name} text, not UTF-8 (line 1) - save it as UTF-8"
    ]


def test_a_quoted_header_is_said_once_with_the_unquoted_one_to_write(folder):
    # ["subjects.toy"] is one top-level table named "subjects.toy": the blend that names toy is no other problem.
    found = problems(folder, GOOD.replace("[subjects.toy]", '["subjects.toy"]'))
    assert found == [
        "unknown key 'subjects.toy' (line 13) - the quotes make it one name; without them it names toy in [subjects]"
    ]


def test_a_name_too_long_for_its_step_s_folders_is_a_problem(folder):
    # The step made .dbl/tmp/<stem>/render-<name>, and on commit .staged-render-<name>: over 255 bytes,
    # "[Errno 36] File name too long", after a train step's work was done.
    render, subject = "r" * 241, "d" * 238
    text = f"""
    [project]
    base_model = "tiny-sd"

    [subjects.{subject}]
    images = "data/dog"
    instance_prompt = "a photo of sks dog"
    [subjects.{subject}.train]
    save_steps = [400]

    [renders.{render}]
    adapter = "none"
    prompts = ["a dog"]
    """
    assert problems(folder, text) == [
        f"subjects.{subject}: a name of 238 characters is too long: the folder .staged-snapshot-<name>@400 that "
        "a build makes would be 259 bytes, over the 255 a file name holds (line 5) - shorten it to 234 characters "
        "at most",
        f"renders.{render}: a name of 241 characters is too long: the folder .staged-render-<name> that a build "
        "makes would be 256 bytes, over the 255 a file name holds (line 11) - shorten it to 240 characters at most",
    ]


@pytest.mark.parametrize(
    "name, problem",
    [
        ("../../x", "names the output folder build/<name>, which would be outside build/"),
        ("/tmp/x", "names the output folder build/<name>, which would be outside build/"),
        (
            "n" * 300,
            "names the output folder build/<name>, and holds a name over the 255 bytes a file name holds",
        ),
    ],
    ids=["up", "absolute", "too long"],
)
def test_a_project_name_that_cannot_name_the_output_folder_is_a_problem(folder, name, problem):
    # Without out, the outputs go to build/<name>: "../../x" wrote them two folders above the project's.
    found = problems(
        folder, GOOD.replace('base_model = "tiny-sd"', f'base_model = "tiny-sd"\nname = "{name}"')
    )
    assert found == [f"project.name: '{name}' {problem} (line 4) - rename the project, or set out = \"...\""]


def test_a_project_name_with_a_slash_still_names_a_folder_in_build(folder):
    (folder / "p.toml").write_text(
        GOOD.replace('base_model = "tiny-sd"', 'base_model = "tiny-sd"\nname = "team/dog"')
    )
    assert load_project(folder / "p.toml").out == folder / "build" / "team" / "dog"
