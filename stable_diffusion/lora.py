"""LoRA files for Stable Diffusion (kohya/A1111 and diffusers/PEFT layouts): parse, merge, unload.

Follows diffusers' ``load_lora_weights`` (loaders/lora_pipeline.py, lora_conversion_utils.py) and the
PEFT LoRA layer (peft/tuners/lora/layer.py): a pair (down = lora_A, up = lora_B) of rank r adds
``scale * alpha / r * up @ down`` to a Linear or Conv2d weight, where ``scale`` is the user's weight
(diffusers' ``set_adapters(adapter_weights=...)``, A1111's ``<lora:name:scale>``). A conv pair has a
(r, in, kh, kw) down and a (out, r, 1, 1) up, as kohya and PEFT write them. Without an alpha
(PEFT files without diffusers' ``lora_adapter_metadata``) alpha = r, as diffusers assumes.

Layouts, by key:
- kohya/A1111: ``lora_unet_<module>``, ``lora_te_<module>`` (``lora_te1_``/``lora_te2_`` for SDXL's
  two encoders), the module path with "." written "_", then ``.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``. UNet modules are spelled either as diffusers names them
  (SD 1.x/2.x trainers) or as the original LDM/SGM UNet does (``input_blocks_4_1_...``: kohya's
  SDXL trainer, some A1111-era SD 1.x files).
- diffusers/PEFT: ``unet.<module>.lora_A.weight``/``.lora_B.weight``, ``text_encoder.``,
  ``text_encoder_2.``; also the older diffusers spellings ``.lora.down/.lora.up``,
  ``.lora_linear_layer.down/.up`` and attention processors (``attn1.processor.to_q_lora.down``).

Merged weights are kept with the weights they replaced, so ``unapply`` restores them bit for bit.
"""

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from . import safetensors_io
from .errors import ModelLoadError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_LYCORIS_HINT = (
    " (LyCORIS LoHa/LoKr/DoRA/Tucker parts are not supported; only plain LoRA up/down pairs are)"
)
# Older diffusers spellings of attention LoRAs: processor name -> module name (UNet, text encoder).
_UNET_PROCESSORS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROCESSORS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}
_PEFT_SUFFIX = re.compile(
    r"^(?P<module>.+?)\.(?:lora_(?P<peft>A|B)\.weight|(?:lora|lora_linear_layer)\.(?P<old>down|up)\.weight)$"
)
_PROCESSOR_SUFFIX = re.compile(r"^(?P<module>.+)\.(?P<proc>to_q|to_k|to_v|to_out)_lora\.(?P<old>down|up)\.weight$")


@dataclass
class LoraPair:
    """One low-rank update, as stored: down (r, in[, kh, kw]) and up (out, r[, 1, 1]), float32."""

    down: mx.array
    up: mx.array
    alpha: float  # the update is scaled by alpha / rank

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoraFile:
    """A parsed LoRA file: its pairs by (component, module name as the file spells it)."""

    path: Path
    layout: str  # "kohya" or "peft"
    pairs: dict[tuple[str, str], LoraPair]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def components(self) -> set[str]:
        return {component for component, _ in self.pairs}


@dataclass
class Applied:
    """What apply() changed: each merged module with the weight it had before, to restore exactly."""

    lora: LoraFile
    scale: float
    originals: list[tuple[str, str, nn.Module, mx.array]]  # (component, module path, module, weight before)


def load(path) -> LoraFile:
    """Read and parse a LoRA ``.safetensors`` file; raise ModelLoadError naming every key we cannot use."""
    path = Path(path).expanduser()
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"{path}: a pickled LoRA file; this library reads safetensors only and never unpickles. "
            "Convert it to .safetensors first"
        )
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such LoRA file")
    arrays, metadata = safetensors_io.load(path)
    if not arrays:
        raise ModelLoadError(f"{path}: the LoRA file holds no tensors")

    kohya = any(k.startswith(tuple(_KOHYA_PREFIXES)) for k in arrays)
    parts, alphas, unknown, not_float, finite = {}, {}, [], [], {}
    parse = _parse_kohya_key if kohya else _parse_peft_key
    for key, value in arrays.items():
        parsed = parse(key)
        if parsed is None:
            unknown.append(key)
            continue
        target, role = parsed
        if role == "alpha":
            alphas[target] = _kohya_alpha(key, value, path)
        elif not mx.issubdtype(value.dtype, mx.floating):
            not_float.append(f"{key} ({_dtype_name(value.dtype)})")
        else:
            finite[key] = mx.isfinite(value).all()
            parts.setdefault(target, {})[role] = value.astype(mx.float32)
    if unknown:
        hint = _LYCORIS_HINT if any(re.search(r"hada_|lokr_|dora_scale|lora_mid|magnitude", k) for k in unknown) else ""
        raise ModelLoadError(f"{path}: {_names(unknown, 'keys')} are not LoRA up/down/alpha keys of the {'kohya' if kohya else 'diffusers/PEFT'} layout{hint}")
    if not_float:
        raise ModelLoadError(f"{path}: {_names(not_float, 'weights')} are not floats; LoRA up/down weights are fp32, fp16 or bf16")
    mx.eval(finite)  # reads every up/down weight once: a NaN or inf in one would blacken every picture
    if not_finite := [key for key, ok in finite.items() if not ok.item()]:
        raise ModelLoadError(f"{path}: {_names(not_finite, 'weights')} hold inf or NaN")

    unpaired = sorted(f"{c}:{m}" for (c, m), p in parts.items() if set(p) != {"down", "up"})
    unpaired += sorted(f"{c}:{m}" for (c, m) in alphas if (c, m) not in parts)
    if unpaired:
        raise ModelLoadError(f"{path}: {_names(unpaired, 'modules')} lack their up, down or weights for their alpha")

    peft_alpha = _peft_alphas(metadata, path) if not kohya else None
    pairs = {}
    bad_shapes = []
    for target, p in parts.items():
        down, up = p["down"], p["up"]
        if down.ndim not in (2, 4) or up.ndim != down.ndim or not 0 < down.shape[0] == up.shape[1] or (up.ndim == 4 and up.shape[2:] != (1, 1)):
            bad_shapes.append(f"{target[0]}:{target[1]} (down {tuple(down.shape)}, up {tuple(up.shape)})")
            continue
        rank = down.shape[0]
        alpha = alphas.get(target) if kohya else peft_alpha(*target, rank)
        pairs[target] = LoraPair(down, up, float(rank) if alpha is None else alpha)
    if bad_shapes:
        raise ModelLoadError(f"{path}: {_names(bad_shapes, 'pairs')} do not form a rank-r LoRA pair")
    return LoraFile(path, "kohya" if kohya else "peft", pairs, metadata)


def _kohya_alpha(key: str, value: mx.array, path: Path) -> float:
    """A kohya ``.alpha`` tensor: one finite real number."""
    if value.size != 1:
        raise ModelLoadError(f"{path}: {key} holds {value.size} numbers (shape {tuple(value.shape)}); an alpha is one number")
    if not (mx.issubdtype(value.dtype, mx.floating) or mx.issubdtype(value.dtype, mx.integer)):
        raise ModelLoadError(f"{path}: {key} is a {_dtype_name(value.dtype)}; an alpha is a real number")
    alpha = float(value.astype(mx.float32).item())
    if not math.isfinite(alpha):
        raise ModelLoadError(f"{path}: {key} is {alpha}; an alpha is a finite number")
    return alpha


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def _parse_kohya_key(key: str):
    """``lora_unet_down_blocks_0_..._to_q.lora_down.weight`` -> (("unet", "down_blocks_0_..._to_q"), "down")."""
    name, _, suffix = key.partition(".")
    role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(suffix)
    for prefix, component in _KOHYA_PREFIXES.items():
        if name.startswith(prefix) and role:
            return (component, name[len(prefix) :]), role
    return None


def _parse_peft_key(key: str):
    """``unet.<module>.lora_A.weight`` (and older diffusers spellings) -> (("unet", "<module>"), "down")."""
    component, _, rest = key.partition(".")
    if component not in COMPONENTS:
        return None
    rest = rest.replace(".processor.", ".")
    if m := _PROCESSOR_SUFFIX.match(rest):
        names = _UNET_PROCESSORS if component == "unet" else _TEXT_PROCESSORS
        return (component, f"{m['module']}.{names[m['proc']]}"), m["old"]
    if m := _PEFT_SUFFIX.match(rest):
        role = {"A": "down", "B": "up"}[m["peft"]] if m["peft"] else m["old"]
        return (component, m["module"]), role
    return None


def _peft_alphas(metadata: dict, path: Path):
    """alpha for (component, module, rank) from diffusers' ``lora_adapter_metadata`` (PEFT LoraConfig
    kwargs, prefixed by component); alpha = rank without it. use_rslora scales by alpha / sqrt(r),
    folded into the alpha returned here."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return lambda component, module, rank: None
    config = _adapter_config(raw, path)
    settings = {c: _component_settings(config, c, path) for c in COMPONENTS if f"{c}.lora_alpha" in config}

    def alpha(component, module, rank):
        if component not in settings:
            return None
        value, patterns, rslora = settings[component]
        value = patterns.value(module, value)
        return value * rank / rank**0.5 if rslora else value

    return alpha


def _adapter_config(raw: str, path: Path) -> dict:
    """The ``lora_adapter_metadata`` JSON object (a hostile file may nest it 50,000 deep)."""
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ModelLoadError(f"{path}: its lora_adapter_metadata is not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: its lora_adapter_metadata is {raw[:40]!r}, not a JSON object of LoraConfig values")
    return config


def _component_settings(config: dict, component: str, path: Path):
    """(lora_alpha, alpha_pattern, use_rslora) of one component, each checked."""
    for flag in ("use_dora", "use_rslora"):
        if config.get(f"{component}.{flag}") not in (None, True, False):
            raise ModelLoadError(f"{path}: {component}.{flag} in its lora_adapter_metadata is {config[f'{component}.{flag}']!r}, not true or false")
    if config.get(f"{component}.use_dora"):
        raise ModelLoadError(f"{path}: a DoRA adapter ({component}.use_dora); only plain LoRA is supported")
    alpha = _alpha_number(config[f"{component}.lora_alpha"], f"{component}.lora_alpha", path)
    patterns = config.get(f"{component}.alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise ModelLoadError(f"{path}: {component}.alpha_pattern in its lora_adapter_metadata is a {type(patterns).__name__}, not an object of module: alpha")
    for key, value in patterns.items():
        if not _MODULE_PATH.fullmatch(key):
            raise ModelLoadError(
                f"{path}: {component}.alpha_pattern key {key[:80]!r} is not a module path (letters, digits, _ and dots); "
                "regular expressions from a file are not evaluated"
            )
    values = {key: _alpha_number(value, f"{component}.alpha_pattern[{key!r}]", path) for key, value in patterns.items()}
    return alpha, _AlphaPattern(values), bool(config.get(f"{component}.use_rslora"))


def _alpha_number(value, what: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelLoadError(f"{path}: {what} in its lora_adapter_metadata is {str(value)[:80]!r}, not a number")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond every float
        number = math.inf
    if not math.isfinite(number):  # Python's JSON reads Infinity and NaN
        raise ModelLoadError(f"{path}: {what} in its lora_adapter_metadata is {str(value)[:80]}, not a finite number")
    return number


# A module path as diffusers writes alpha_pattern keys. peft reads the keys as regular expressions;
# one from a file is never evaluated as one ("(a|a)+" backtracks for hours on "a" * 34 + "!").
_MODULE_PATH = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")


class _AlphaPattern:
    """peft's ``get_pattern_key`` for module-path keys: the first key, in the file's order, that is the
    module path or its end after a "." (peft: ``re.match(rf"(.*\\.)?({key})$", module)``; its "." may
    also stand for another character, which no module path of these models tells apart). A module
    costs one dict lookup per distinct key length: nothing backtracks, whatever the names."""

    def __init__(self, values: dict[str, float]):
        self.ranked = {key: (i, value) for i, (key, value) in enumerate(values.items())}
        self.lengths = {len(key) for key in values}

    def value(self, module: str, default: float) -> float:
        ends = (module[len(module) - n :] for n in self.lengths if n == len(module) or (n < len(module) and module[-n - 1] == "."))
        found = [self.ranked[end] for end in ends if end in self.ranked]
        return min(found)[1] if found else default


def apply(models: dict, lora: LoraFile, scale: float = 1.0) -> Applied:
    """Merge ``scale * alpha / r * up @ down`` into the weights of ``models`` ("unet", "text_encoder",
    "text_encoder_2"). Every target is resolved and checked, and every merged weight computed and found
    finite, before any weight changes."""
    if not math.isfinite(scale):
        raise ValueError(f"{lora.path}: the LoRA scale {scale!r} is not a finite number")
    missing = sorted(lora.components - {k for k, m in models.items() if m is not None})
    if missing:
        raise ModelLoadError(f"{lora.path}: the LoRA has layers for {', '.join(missing)}, which this model does not have")

    plan, errors = [], []
    indexes = {c: _module_index(c, models[c]) for c in lora.components}
    for (component, name), pair in lora.pairs.items():
        path = indexes[component].get(name)
        if path is None:
            errors.append(f"{component}:{name}")
            continue
        module = _get_module(models[component], path)
        if isinstance(module, nn.QuantizedLinear):
            raise ModelLoadError(
                f"{lora.path}: {component}.{path} is quantized; load LoRAs before quantize() (merging into quantized weights would be silently wrong)"
            )
        shape = _torch_shape(module)
        if pair.up.shape[0] != shape[0] or _size(pair.down.shape[1:]) != _size(shape[1:]) or (
            pair.down.ndim == 4 and len(shape) == 4 and tuple(pair.down.shape[2:]) != tuple(shape[2:])
        ):
            errors.append(f"{component}:{name} (LoRA {tuple(pair.up.shape[:1]) + tuple(pair.down.shape[1:])} vs weight {shape})")
            continue
        plan.append((component, path, module, pair))
    if errors:
        raise ModelLoadError(f"{lora.path}: {_names(errors, 'LoRA targets')} match no layer of this model (or not its shape); nothing was applied")

    merges, overflowed = [], []
    for component, path, module, pair in plan:
        weight = module.weight
        # Both in PyTorch layout: (out, r) @ (r, in * kh * kw), then to the weight's own layout.
        delta = (pair.up.reshape(pair.up.shape[0], -1) @ pair.down.reshape(pair.rank, -1)) * (scale * pair.alpha / pair.rank)
        if weight.ndim == 4:
            out, kh, kw, cin = weight.shape
            delta = delta.reshape(out, cin, kh, kw).transpose(0, 2, 3, 1)  # (out, kh, kw, in)
        merged = (weight.astype(mx.float32) + delta.reshape(weight.shape)).astype(weight.dtype)
        finite = mx.isfinite(merged).all()
        mx.eval(weight, merged, finite)  # one layer at a time: the transient delta never exceeds one weight
        if finite.item():
            merges.append((component, path, module, weight, merged))
        else:
            overflowed.append(f"{component}.{path} ({_dtype_name(weight.dtype)})")
    if overflowed:
        raise ModelLoadError(f"{lora.path}: at scale {scale:g} the update overflows {_names(overflowed, 'weights')} to inf or NaN; nothing was applied")
    for _, _, module, _, merged in merges:
        module.weight = merged
    return Applied(lora, scale, [(component, path, module, weight) for component, path, module, weight, _ in merges])


def unapply(models: dict, applied):
    """Put back the weights apply() replaced. Given several Applied (in the order they were applied),
    they are undone last first, so the originals come back bit for bit."""
    stack = applied if isinstance(applied, (list, tuple)) else [applied]
    for one in reversed(stack):
        for component, path, module, weight in reversed(one.originals):
            if _get_module(models[component], path) is not module:
                raise ValueError(f"{component}.{path} was replaced since the LoRA was applied (quantize()?); cannot unload it")
            module.weight = weight


def _module_index(component: str, model) -> dict[str, str]:
    """Every spelling a LoRA file may use for a Linear/Conv2d of ``model`` -> our module path."""
    index = {}
    prefixes = _ldm_unet_prefixes(model.config) if component == "unet" else None
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d, nn.QuantizedLinear)):
            continue
        spellings = [path]
        if component == "unet":
            ldm = _ldm_unet_name(prefixes, path)
            if ldm:
                spellings.append(ldm)
        elif path.startswith("text_model."):
            spellings.append(path[len("text_model.") :])  # transformers >= 5 drops CLIPTextModel's text_model.
        for name in spellings:
            index[name] = path
            index[name.replace(".", "_")] = path  # kohya's spelling
    return index


_RESNET_LDM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _ldm_unet_prefixes(config) -> dict[str, str]:
    """diffusers block prefix -> the original (LDM/SGM) UNet's, from the UNet config."""
    prefixes = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_out": "out.2",
    }
    n_blocks = len(config.block_out_channels)
    i = 1
    for b in range(n_blocks):
        for j in range(config.layers_per_block[b]):
            prefixes[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{i}.0"
            prefixes[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
            i += 1
        if b < n_blocks - 1:
            prefixes[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    for j in range(config.mid_block_layers + 1):
        prefixes[f"mid_block.resnets.{j}"] = f"middle_block.{2 * j}"
        prefixes[f"mid_block.attentions.{j}"] = f"middle_block.{2 * j + 1}"
    i = 0
    for b in range(n_blocks):
        n = config.layers_per_block[::-1][b] + 1
        attends = config.up_block_types[b] == "CrossAttnUpBlock2D"
        for j in range(n):
            prefixes[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{i}.0"
            prefixes[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
            if j == n - 1 and b < n_blocks - 1:
                prefixes[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{i}.{2 if attends else 1}.conv"
            i += 1
    return prefixes


def _ldm_unet_name(prefixes: dict[str, str], path: str):
    """Our UNet module path in the original UNet's spelling (None outside the mapped blocks)."""
    parts = path.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in prefixes:
            tail = ".".join(parts[n:])
            if ".resnets." in head:
                tail = _RESNET_LDM.get(tail, tail)
            return prefixes[head] + ("." + tail if tail else "")
    return None


def _get_module(model, path: str):
    module = model
    for part in path.split("."):
        module = module[int(part)] if isinstance(module, list) else getattr(module, part)
    return module


def _torch_shape(module) -> tuple:
    """The weight's PyTorch shape: (out, in) or (out, in, kh, kw) (ours is (out, kh, kw, in))."""
    shape = tuple(module.weight.shape)
    return (shape[0], shape[3], shape[1], shape[2]) if len(shape) == 4 else shape


def _size(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _names(items, what: str, limit: int = 8) -> str:
    items = sorted(items)
    shown = ", ".join(items[:limit])
    return f"{len(items)} {what} ({shown}{', ...' if len(items) > limit else ''})"


def a1111_name(path) -> str:
    """The name A1111 writes in ``<lora:NAME:scale>`` and in ``Lora hashes``: the file name without
    its extension (A1111's default "Alias from file" prefers the ``ss_output_name`` metadata only
    when the user picks that option; the file name is what resolves back to the file)."""
    return Path(path).stem


def short_hash(path) -> str:
    """A1111's LoRA short hash: the first 12 hex digits of kohya's "addnet" hash, the sha256 of the
    safetensors file *after* its header (so editing the metadata does not change it), or of the
    ``sshs_model_hash`` metadata when the file carries one (A1111 prefers it).

    A1111: extensions-builtin/Lora/network.py (NetworkOnDisk.set_hash: ``self.hash[0:12]``,
    read_hash with ``use_addnet_hash=True`` for safetensors) and modules/hashes.py
    (``addnet_hash_safetensors``). The infotext carries ``Lora hashes: "name: hash, name: hash"``
    (extra_networks_lora.py), each name with ":" and "," removed; see ``infotext_hashes``.
    """
    path = Path(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n)
        try:
            stored = json.loads(header).get("__metadata__", {}).get("sshs_model_hash")
        except (json.JSONDecodeError, AttributeError):
            stored = None
        if stored:
            return stored[:12]
        sha = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:12]


def infotext_hashes(paths) -> str:
    """The value of A1111's ``Lora hashes`` infotext field for these files, unquoted
    (``name: hash, name: hash``; A1111's infotext writer then quotes it, as it contains ":")."""
    clean = str.maketrans("", "", ":,")
    return ", ".join(f"{a1111_name(p).translate(clean)}: {short_hash(p)}" for p in paths)
