"""Base models: the built-in ones (see runner.families), hub ids, local diffusers folders and single-file checkpoints.

Everything here imports torch and diffusers inside functions, so that importing this module is cheap.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from runner import families, tempnames
from runner.errors import ModelError  # noqa: F401 - re-exported
from runner.fingerprint import hub_revision

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
# Pipeline components that load_pipeline passes itself, so a folder need not hold them.
NOT_LOADED = ("safety_checker",)
SINGLE_FILE_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES


@dataclass(frozen=True)
class BaseModel:
    """Where a base model comes from, as the project file names it."""

    kind: str  # "builtin" | "hub" | "folder" | "file"
    ref: str  # builtin name, hub id, or absolute path
    revision: str | None = None
    allow_pickle: bool = False
    # A single file's component configs and tokenizers: a diffusers folder (absolute path) or a hub id,
    # passed to from_single_file as `config`. None: diffusers infers them (and reads them from the hub).
    config: str | None = None
    # The value as the project file writes it (a local path relative to the project file): what outputs
    # record, so that the same project in another folder writes the same bytes. Not part of equality.
    written: str = field(default="", compare=False)

    @classmethod
    def parse(
        cls,
        value: str,
        project_dir: Path,
        revision: str | None = None,
        allow_pickle: bool = False,
        config: str | None = None,
    ):
        if value in families.builtin_names():
            return cls("builtin", value, None, allow_pickle, written=value)
        path = local_path(value, project_dir)
        if path.is_dir():
            return cls("folder", str(path), None, allow_pickle, written=value)
        if path.is_file() or value.endswith(SINGLE_FILE_SUFFIXES):
            return cls("file", str(path), None, allow_pickle, config_ref(config, project_dir), written=value)
        return cls("hub", value, revision, allow_pickle, written=value)

    @classmethod
    def of(cls, settings, project_dir: Path):
        """The base model of a project's [project] settings (runner.project.schema.ProjectSettings)."""
        return cls.parse(
            settings.base_model,
            project_dir,
            settings.revision,
            settings.allow_pickle,
            settings.base_model_config,
        )

    @property
    def recorded(self) -> str:
        """What an adapter records as its base model (PEFT's `base_model_name_or_path`, dbl.json): a hub id
        or built-in name as it is, a local folder or file as the project file writes it."""
        return self.written if self.kind in ("folder", "file") and self.written else self.ref

    @property
    def display(self) -> str:
        if self.kind == "hub" and self.revision:
            return f"{self.ref}@{self.revision}"
        return self.ref


def local_path(value: str, project_dir: Path) -> Path:
    """`value` as a path: ~ expanded, relative to the project folder."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else (project_dir / path).resolve()


def looks_local(value: str) -> bool:
    """Whether a base-model value is written as a path rather than a hub id (owner/name)."""
    return value.startswith((".", "/", "~")) or value.count("/") > 1


def config_ref(value: str | None, project_dir: Path) -> str | None:
    """A base_model_config value as from_single_file takes it: a folder's absolute path, or a hub id."""
    if value is None:
        return None
    path = local_path(value, project_dir)
    return str(path) if path.is_dir() or looks_local(value) else value


# --- built-in models --------------------------------------------------------------------------------


def dbl_home() -> Path:
    """Per-user folder for things dbl makes once and reuses (the built-in models)."""
    return Path(os.environ.get("DBL_HOME", Path.home() / ".cache" / "dbl"))


_tiny_lock = threading.Lock()


def ensure_builtin(name: str) -> Path:
    """Return the folder of a built-in model, making it on first use (atomically)."""
    family = families.for_builtin(name)
    folder = dbl_home() / "models" / family.builtin_folder_name(name)
    if (folder / "model_index.json").is_file():
        return folder
    with _tiny_lock:
        if (folder / "model_index.json").is_file():
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".{folder.name}.tmp-{tempnames.suffix()}"
        family.build_builtin(name, tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            # Another process finished first; its copy is identical.
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --- loading ---------------------------------------------------------------------------------------


def resolve_device(name: str) -> str:
    """Map the project's `device` setting to a torch device string."""
    import torch

    if name != "auto":
        if name.partition(":")[0] == "cuda":  # cuda, or cuda:N (the notebook API)
            if not torch.cuda.is_available():
                raise ModelError(
                    f"device = '{name}' but no CUDA device is available; set device = 'auto' or 'cpu'"
                )
            index = int(name.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                raise ModelError(
                    f"device = '{name}' but there are {torch.cuda.device_count()} CUDA devices (cuda:0 "
                    f"to cuda:{torch.cuda.device_count() - 1})"
                )
        if name == "mps" and not torch.backends.mps.is_available():
            raise ModelError("device = 'mps' but MPS is not available; set device = 'auto' or 'cpu'")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# The mixed precisions resolve_dtype has said it ignores on the CPU in this process. Python's own "once per
# place" forgets what it said whenever a warnings filter is restored, as loading each pipeline does: a
# build said it again for every step that loads the base model.
_IGNORED_SAID: set[str] = set()


def resolve_dtype(mixed_precision: str, device: str):
    """The compute dtype for frozen weights. On a CPU, half precision is ignored with a warning (once)."""
    import torch

    if mixed_precision == "no":
        return torch.float32
    if device == "cpu":
        if mixed_precision not in _IGNORED_SAID:
            _IGNORED_SAID.add(mixed_precision)
            warnings.warn(
                f"mixed_precision = '{mixed_precision}' is ignored on the CPU; computing in fp32",
                stacklevel=2,
            )
        return torch.float32
    return torch.float16 if mixed_precision == "fp16" else torch.bfloat16


def _check_pickle(path: Path, allow_pickle: bool) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelError(
            f"{path}: pickle checkpoints can run arbitrary code when loaded, so dbl refuses them. "
            "Convert it to .safetensors, or set allow_pickle = true in [project] if you trust the file."
        )


def model_folder(base: BaseModel) -> str:
    """A path or hub id that from_pretrained accepts (builtin models are made on first use)."""
    if base.kind == "builtin":
        return str(ensure_builtin(base.ref))
    return base.ref


def folder_variant(folder: Path) -> str | None:
    """The weights variant ("fp16") to load a local diffusers folder with: the one its components are saved
    in when some component has variant weights only (`save_pretrained(variant="fp16")`, a download of the
    fp16 files alone). None when every component has plain weights: variant files beside them are unused."""
    variants = set()
    for component in sorted(p for p in Path(folder).iterdir() if p.is_dir()):
        names = [p.name.split(".") for p in component.iterdir() if p.name.endswith((".safetensors", ".bin"))]
        # model.safetensors and model-00001-of-00002.bin are plain weights; model.fp16.safetensors a variant
        if names and all(len(parts) > 2 for parts in names):
            variants.update(parts[-2] for parts in names)
    return min(variants, key=lambda v: (v != "fp16", v)) if variants else None


def quiet_libraries() -> None:
    """Silence what diffusers and transformers print on every load (progress bars, the torchvision
    notice): dbl shows its own progress."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached from here (a failed name lookup or connection, found
    in at most a few seconds), or None. Without a network, the hub client retries each request for
    about 20 s; where this says why, loads read the Hugging Face cache alone instead."""
    from huggingface_hub import constants

    return "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _probe_hub(constants.ENDPOINT)


@functools.cache
def _probe_hub(endpoint: str) -> str | None:
    """Why a connection to `endpoint` fails, or None; asked once per process. Through a proxy the hub is
    not probed (a direct connection says nothing of it)."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    url, proxies = urlsplit(endpoint), urllib.request.getproxies()
    if url.scheme in proxies or "all" in proxies or not url.hostname:
        return None
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=5).close()
    except OSError as exc:
        return f"{url.hostname} cannot be reached ({exc.strerror or exc})"
    return None


def fetch_hub_index(base: BaseModel) -> None:
    """Put a hub model's model_index.json in the Hugging Face cache (a few hundred bytes) where it is not
    there yet, so that its family and commit are known before its weights are downloaded; quietly nothing
    when offline. A cached model is left as it is: fetching would move its branch (`refs/main`) to the hub's
    newest commit, another one than the build planned with."""
    if base.kind != "hub" or families.cached_hub_index(base.ref, base.revision).is_file():
        return
    if hub_unreachable():
        return
    try:
        from huggingface_hub import hf_hub_download

        hf_hub_download(base.ref, "model_index.json", revision=base.revision)
    except Exception:  # noqa: BLE001 - offline, private or unknown: detection falls back to sd1
        pass


def load_pipeline(base: BaseModel, dtype=None, device: str = "cpu", family=None):
    """Load the pipeline of a base model (its family's class), without safety checker."""
    import torch

    if family is None:
        fetch_hub_index(base)
        family = families.detect(base)
    quiet_libraries()
    dtype = dtype or torch.float32
    kwargs = dict(torch_dtype=dtype, **dict.fromkeys(NOT_LOADED), requires_safety_checker=False)
    # Without a hub to ask, what a load reads from it (a hub model; a single file's configs) comes from
    # the Hugging Face cache alone.
    reads_hub = base.kind == "hub" or (
        base.kind == "file" and not (base.config and Path(base.config).is_dir())
    )
    offline = hub_unreachable() if reads_hub else None
    if offline:
        kwargs["local_files_only"] = True
    try:
        with warnings.catch_warnings():
            # diffusers 0.42 renamed torch_dtype to dtype; older supported versions know only torch_dtype.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            if base.kind == "file":
                path = Path(base.ref)
                if not path.is_file():
                    raise ModelError(f"base_model file {path} does not exist")
                _check_pickle(path, base.allow_pickle)
                if base.config is not None:
                    kwargs["config"] = base.config
                    # A hub id: its configs at the commit the identity names.
                    if not Path(base.config).is_dir():
                        kwargs["revision"] = hub_revision(base.config, None)
                pipe = family.load_single_file(str(path), **kwargs)
            else:
                if base.kind == "folder" and (variant := folder_variant(Path(base.ref))):
                    kwargs["variant"] = variant
                pipe = family.load_pretrained(
                    model_folder(base),
                    # The commit the model's identity names, not its branch: outputs are always
                    # made from the weights their record names, whatever the hub's branch is now.
                    revision=hub_revision(base.ref, base.revision) if base.kind == "hub" else None,
                    use_safetensors=None if base.allow_pickle else True,
                    **kwargs,
                )
    except ModelError:
        raise
    except OSError as exc:
        hint = ""
        if base.kind == "hub" and offline:  # what diffusers adds says the same at more length
            raise ModelError(
                f"cannot load base model {base.display}: it is not in the Hugging Face cache, and {offline}; "
                "load it once where there is a network, or set base_model to a local diffusers folder"
            ) from exc
        if base.kind == "hub":
            hint = " (is the id right, and is the network or the Hugging Face cache available?)"
        elif base.kind == "file" and base.config is None and offline:
            hint = (
                f" (diffusers reads a single file's component configs from the hub, and {offline}: set "
                "base_model_config in [project] to a diffusers folder of the same kind of model)"
            )
        elif base.kind == "file" and base.config is None:
            hint = (
                " (diffusers reads a single file's component configs from the hub: without a network, set "
                "base_model_config in [project] to a diffusers folder of the same kind of model)"
            )
        raise ModelError(f"cannot load base model {base.display}{hint}: {exc}") from exc
    if base.kind == "builtin":
        check_all_loaded(pipe, Path(model_folder(base)), base.display)
    pipe.set_progress_bar_config(disable=True)
    pipe._dbl_family = family  # read back by runner.families.of(pipe)
    return pipe.to(device)


def check_all_loaded(pipe, folder: Path, display: str) -> None:
    """Refuse a pipeline whose modules do not hold every weight saved in `folder`.

    transformers only warns about a saved weight it cannot place, and leaves that part of the model at
    random: a transformers before 5.6 does so with a text encoder saved by 5.6 or later (which dropped
    CLIPTextModel's `text_model.` level). Training on it runs, and is wrong. The built-in models are a
    few MB, so reading their weights again costs nothing."""
    import torch
    from safetensors import safe_open

    from runner.safetensors_io import same_values

    for path in sorted(folder.glob("*/*.safetensors")):
        module = getattr(pipe, path.parent.name, None)
        if not isinstance(module, torch.nn.Module):
            continue
        # The one layout change between supported versions, which newer versions read both ways.
        loaded = {k.removeprefix("text_model."): v for k, v in module.state_dict().items()}
        with safe_open(str(path), framework="pt") as saved:
            wrong = [
                key
                for key in saved.keys()  # noqa: SIM118 - a safe_open handle is not a mapping
                if (have := loaded.get(key.removeprefix("text_model."))) is None
                or not same_values(saved.get_tensor(key).to(have.device, have.dtype), have)
            ]
        if wrong:
            import transformers

            raise ModelError(
                f"base model {display}: {len(wrong)} of the weights saved in {path} did not load under "
                f"transformers {transformers.__version__} (first: {wrong[0]}), so {path.parent.name} "
                "would be random: install the transformers dbl declares (pip install 'transformers>=5.15,<6')"
            )


class ModelCache:
    """Loaded base pipelines, shared by the steps of one build so that each is loaded once."""

    def __init__(self, base: BaseModel, device: str = "auto", mixed_precision: str = "no"):
        self.base = base
        self.device = resolve_device(device)
        self.mixed_precision = mixed_precision
        self._pipes: dict = {}
        self._family = None

    @property
    def family(self):
        """The base model's runner.families.Family (detected once, from cheap facts)."""
        if self._family is None:
            fetch_hub_index(self.base)
            self._family = families.detect(self.base)
        return self._family

    @property
    def dtype(self):
        return resolve_dtype(self.mixed_precision, self.device)

    def pipeline(self, dtype=None):
        """The shared pipeline in `dtype` (default: the project's compute dtype). Callers must leave it
        as they found it: unload adapters they load, restore schedulers they swap."""
        dtype = dtype or self.dtype
        key = str(dtype)
        if key not in self._pipes:
            self._pipes[key] = load_pipeline(self.base, dtype=dtype, device=self.device, family=self.family)
        return self._pipes[key]

    def clear(self) -> None:
        self._pipes.clear()


# --- Stable Diffusion 1.5 shapes, random weights (benchmarks) ---------------------------------------


def sd15_random_pipeline(device: str = "cpu", dtype=None, seed: int = 0):
    """A pipeline with Stable Diffusion 1.5's architecture (860M-parameter UNet, its VAE and CLIP ViT-L/14
    text encoder) and seeded random weights: real memory and compute for benchmarks, no download.

    Built in memory on `device` (fast on a GPU). Its pictures are noise; the tokenizer is tiny-sd's
    character-level one, whose ids all fall inside CLIP's vocabulary.
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from runner.families.sd1 import _tiny_tokenizer_vocab

    quiet_libraries()
    dtype = dtype or torch.float32
    vocab = _tiny_tokenizer_vocab()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=(
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            sample_size=512,
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=2,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            scaling_factor=0.18215,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                projection_dim=768,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
            )
        )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        unet=unet.to(dtype),
        vae=vae.to(dtype),
        text_encoder=text_encoder.to(dtype),
        tokenizer=CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
