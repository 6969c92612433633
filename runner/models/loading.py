"""Loading a base model's pipeline on a device, in a dtype: the device and dtype a project's settings
name, the checks a load makes (pickle files, weights that did not load), and ModelCache, which shares
the loaded pipelines among the steps of one build.

torch and diffusers are imported inside functions, so that importing this module is cheap.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from runner import families
from runner.errors import ModelError, os_words
from runner.fingerprint import hub_revision
from runner.models import hub
from runner.models.builtin import ensure_builtin
from runner.models.identity import PICKLE_SUFFIXES, BaseModel

# Pipeline components that load_pipeline passes itself, so a folder need not hold them.
NOT_LOADED = ("safety_checker",)


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


def loads_straight_to(device: str) -> str | None:
    """Where the weights of a pipeline for `device` are read straight onto (diffusers' `device_map`), rather
    than into host memory and copied over: None where they are not. A CUDA device by its type alone ("cuda",
    the device of a step on one GPU) is the one device diffusers' pipelines take of those dbl runs on; an
    indexed one ("cuda:1", a rank of a multi-GPU step) is read onto "cuda" where it is the current device,
    as a rank's is (torch puts "cuda" tensors there), and otherwise onto the CPU and moved. So is MPS,
    whose memory is the host's."""
    from diffusers.pipelines.pipeline_utils import SUPPORTED_DEVICE_MAP

    kind, _, index = device.partition(":")
    if kind != "cuda" or "cuda" not in SUPPORTED_DEVICE_MAP:
        return None
    if device == "cuda":
        return "cuda"
    import torch

    current = torch.cuda.current_device() if torch.cuda.is_available() else None
    return "cuda" if index.isdigit() and int(index) == current else None


def load_pipeline(base: BaseModel, dtype=None, device: str = "cpu", family=None):
    """Load the pipeline of a base model (its family's class), without safety checker, on `device`."""
    import torch

    if family is None:
        hub.fetch_hub_index(base)
        family = families.detect(base)
    quiet_libraries()
    dtype = dtype or torch.float32
    kwargs = dict(torch_dtype=dtype, **dict.fromkeys(NOT_LOADED), requires_safety_checker=False)
    # Without a hub to ask, what a load reads from it (a hub model; a single file's configs) comes from
    # the Hugging Face cache alone.
    reads_hub = base.kind == "hub" or (
        base.kind == "file" and not (base.config and Path(base.config).is_dir())
    )
    offline = hub.hub_unreachable() if reads_hub else None
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
                if onto := loads_straight_to(device):
                    kwargs["device_map"] = onto
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
        raise ModelError(f"cannot load base model {base.display}{hint}: {os_words(exc)}") from exc
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
            hub.fetch_hub_index(self.base)
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
