"""Project files: each problem of a value (its type, its range, LoRA, loss and optimizer settings) gives an
exact, located message."""

from __future__ import annotations

import pytest

from tests.project_fixtures import assert_problem_said, folder  # noqa: F401 (a fixture)

CASES = [
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
        "train.save_steps: must be at least 1, got 0 (line {line}) - e.g. save_steps = [1, 2]",
    ),
    (
        "unknown log",
        '[train]\nlog = "wandb"\n',
        "train.log: 'wandb' is not one of tensorboard, none (line {line})",
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
        # At 8192 every image was refused as too large to train on: "crop it", which cannot help.
        "resolution above what any image trains at",
        "[train]\nresolution = 8192\n",
        "train.resolution: must be at most 5792, got 8192 (line {line}) - e.g. resolution = 512",
    ),
    (
        "caption dropout above 1",
        "[train]\ncaption_dropout = 1.5\n",
        "train.caption_dropout: must be at most 1, got 1.5 (line {line}) - e.g. caption_dropout = 0.1",
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
        "snr_gamma negative",
        "[subjects.dog.train]\nsnr_gamma = -5\n",
        "subjects.dog.train.snr_gamma: must be at least 0, got -5.0 (line {line}) - e.g. snr_gamma = 5.0",
    ),
    (
        "noise_offset negative",
        "[train]\nnoise_offset = -0.1\n",
        "train.noise_offset: must be at least 0, got -0.1 (line {line}) - e.g. noise_offset = 0.0",
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
        "a blend weight written as a string (it said 'expected a table ..., got a table')",
        '[blends.b]\nadapters = { dog = 1.0, toy = "0.8" }\n',
        "blends.b.adapters: the weight of toy must be a number, got the string '0.8' (line {line}) - e.g. "
        "adapters = {{ dog = 1.0 }}",
    ),
    (
        "a blend weight written as a list",
        "[blends.b]\nadapters = { dog = [1] }\n",
        "blends.b.adapters: the weight of dog must be a number, got a list of integers (line {line}) - e.g. "
        "adapters = {{ dog = 1.0 }}",
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
        "train.prodigy_beta3: must be at most 1, got 1.5 (line {line}) - e.g. prodigy_beta3 = 0.99",
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
        "lora.dropout: must be at most 1, got 1.5 (line {line}) - e.g. dropout = 0.0",
    ),
    (
        "text encoder dropout above 1",
        "[lora]\ntext_encoder_dropout = 2\n",
        "lora.text_encoder_dropout: must be at most 1, got 2.0 (line {line}) - e.g. text_encoder_dropout = 0.0",
    ),
]


@pytest.mark.parametrize("extra, expected", [(c[1], c[2]) for c in CASES], ids=[c[0] for c in CASES])
def test_problem_messages(folder, extra, expected):  # noqa: F811
    assert_problem_said(folder, extra, expected)


def test_the_largest_resolution_is_the_largest_whose_square_image_trains():
    from runner.images import MAX_RESIZED_PIXELS
    from runner.project.train_settings import MAX_RESOLUTION

    assert MAX_RESOLUTION % 8 == 0
    assert MAX_RESOLUTION**2 <= MAX_RESIZED_PIXELS < (MAX_RESOLUTION + 8) ** 2
