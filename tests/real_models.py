"""Full-size Stable Diffusion folders from the real Hub configs, with random weights.

Each preset's folder is laid out like its Hugging Face repo: the verbatim ``model_index.json``,
``config.json``, ``scheduler_config.json`` and tokenizer files of the Hub (copied byte for byte from
the package's ``stable_diffusion/configs/``, quirks kept: SD 2.x's ``tokenizer_config.json`` pads with
``<|endoftext|>`` while its ``special_tokens_map.json`` says ``!``; sdxl-turbo's newer tokenizer
format with ``added_tokens_decoder``; the weight file names and variants the Hub has), the real
CLIP ``vocab.json``/``merges.txt`` (from the open_clip wheel, see tiny_models.write_clip_vocab) and
random weights of the real shapes.

sd-turbo has no verbatim copy: it has SD 2.1-base's architecture, so it is SD 2.1-base's configs
with the turbo scheduler (Euler ancestral, trailing spacing), as sdxl-turbo's.

Weights are written by a streaming safetensors writer from the parameter names and shapes of the
diffusers/transformers models built on the meta device (no 10 GB module in memory), each tensor
drawn from its own seeded generator, so the fp32 file and its ``.fp16.`` variant hold the same
values; SD 1.5's ``unet/diffusion_pytorch_model.non_ema.safetensors`` holds different ones (another
seed), so a loader that merges or picks the wrong variant drifts from diffusers. The presets of
one architecture share their weight files by hard links (SD 2.1-base, SD 2.1, sd-turbo; SDXL base
and turbo).

Also a command line, used by tests/test_real_models.py to keep each big model in its own process
(SDXL's UNet alone is 10.3 GB in float32) and by bench/load_memory.py:

    python tests/real_models.py weights ARCH DIR          # sd1 | sd2 | sdxl
    python tests/real_models.py folder PRESET DIR --weights WDIR --vocab VDIR
    python tests/real_models.py reference PRESET FOLDER INIT.npy OUT.npz   # diffusers
    python tests/real_models.py ours PRESET FOLDER INIT.npy OUT.npz        # this package
    python tests/real_models.py component-reference unet|controlnet FOLDER IN.npz OUT.npz   # one call, diffusers
    python tests/real_models.py component-ours unet|controlnet FOLDER IN.npz OUT.npz        # one call, this package
"""

import argparse
import json
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The verbatim Hub files shipped with the package (stable_diffusion/configs/SOURCES.json names each
# repo, revision and git blob id), read from there: the one copy. sd-turbo is derived below.
CONFIGS_DIR = ROOT / "stable_diffusion" / "configs"
SHIPPED = {
    "sd-1.5": "stable-diffusion-v1-5",
    "sd-2.1-base": "stable-diffusion-2-1-base",
    "sd-2.1": "stable-diffusion-2-1",
    "sdxl-base": "stable-diffusion-xl-base-1.0",
    "sdxl-turbo": "sdxl-turbo",
}


def _shipped(folder: str) -> dict:
    """{path in the repo: parsed JSON} of one shipped Hub repo."""
    root = CONFIGS_DIR / folder
    return {p.relative_to(root).as_posix(): json.loads(p.read_bytes()) for p in sorted(root.rglob("*.json"))}


SD15, SD21_BASE, SD21, SDXL_BASE, SDXL_TURBO = (_shipped(folder) for folder in SHIPPED.values())

# sd-turbo: SD 2.1-base's architecture with the turbo scheduler (no verbatim copy of its files was found).
SD_TURBO = {
    **SD21_BASE,
    "model_index.json": {**SD21_BASE["model_index.json"], "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"]},
    "scheduler/scheduler_config.json": {
        **SD21_BASE["scheduler/scheduler_config.json"],
        "_class_name": "EulerAncestralDiscreteScheduler",
        "timestep_spacing": "trailing",
    },
}

CONFIGS = {
    "sd-1.5": SD15,
    "sd-2.1-base": SD21_BASE,
    "sd-2.1": SD21,
    "sd-turbo": SD_TURBO,
    "sdxl-base": SDXL_BASE,
    "sdxl-turbo": SDXL_TURBO,
}
PRESETS = tuple(CONFIGS)
ARCH = {"sd-1.5": "sd1", "sd-2.1-base": "sd2", "sd-2.1": "sd2", "sd-turbo": "sd2", "sdxl-base": "sdxl", "sdxl-turbo": "sdxl"}
ARCH_CONFIGS = {"sd1": SD15, "sd2": SD21_BASE, "sdxl": SDXL_BASE}  # the weight shapes of each architecture

# The safetensors files of each component as the Hub names them: (file, seed, dtype). The same seed
# gives the same values (the fp16 variant is the fp32 file rounded); SD 1.5's non_ema and SDXL
# base's vae_1_0 get another seed, so picking or merging them shows. SD 2.x's fp16 weights are
# .bin files on another branch: no safetensors variant.
_UNET, _TEXT = "diffusion_pytorch_model", "model"


def _files(stem: str, fp16: bool, seed: int = 0) -> list:
    return [(f"{stem}.safetensors", seed, "F32")] + ([(f"{stem}.fp16.safetensors", seed, "F16")] if fp16 else [])


WEIGHT_FILES = {
    "sd1": {
        "unet": _files(_UNET, True) + [(f"{_UNET}.non_ema.safetensors", 1, "F32")],
        "vae": _files(_UNET, True),
        "text_encoder": _files(_TEXT, True),
    },
    "sd2": {"unet": _files(_UNET, False), "vae": _files(_UNET, False), "text_encoder": _files(_TEXT, False)},
    "sdxl": {
        "unet": _files(_UNET, True),
        "vae": _files(_UNET, True),
        "vae_1_0": _files(_UNET, True, seed=1),
        "text_encoder": _files(_TEXT, True),
        "text_encoder_2": _files(_TEXT, True),
    },
}
MODEL_COMPONENTS = {"sd1": ("unet", "vae", "text_encoder"), "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2")}
MODEL_COMPONENTS["sd2"] = MODEL_COMPONENTS["sd1"]


def expected_weight_files(preset: str, float16: bool) -> list[str]:
    """The one file per component that diffusers' variant rule loads (fp16 only when asked for and present)."""
    arch = ARCH[preset]
    chosen = []
    for component in MODEL_COMPONENTS[arch]:
        names = [name for name, _, _ in WEIGHT_FILES[arch][component]]
        stem = _UNET if component in ("unet", "vae") else _TEXT
        fp16 = f"{stem}.fp16.safetensors"
        chosen.append(f"{component}/{fp16 if float16 and fp16 in names else stem + '.safetensors'}")
    return sorted(chosen)


# What the parity runs do: a small-latent txt2img, guided except for the distilled (turbo) models,
# which run without guidance. The prompt has "!" (SD 2's pad token).
PROMPT = "A photo of an astronaut riding a horse on Mars!! Wow!"
STEPS, NEGATIVE, LATENT, NOISE_SEED = 2, "", 8, 7
CFG = {"sd-1.5": 5.0, "sd-2.1-base": 5.0, "sd-2.1": 5.0, "sd-turbo": 0.0, "sdxl-base": 5.0, "sdxl-turbo": 0.0}


# Random weights of the real shapes, written tensor by tensor.
def parameter_shapes(component: str, config: dict) -> dict:
    """{key as the Hub's file spells it: shape} of a component, from its model built on the meta device."""
    import torch

    with torch.device("meta"):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_config(config)
        elif component == "controlnet":
            from diffusers import ControlNetModel

            model = ControlNetModel.from_config(config)
        elif component.startswith("vae"):
            from diffusers import AutoencoderKL

            model = AutoencoderKL.from_config(config)
        else:
            import transformers

            text_config = transformers.CLIPTextConfig.from_dict(config)
            model = getattr(transformers, config["architectures"][0])(text_config)
    shapes = {}
    for key, value in model.state_dict().items():
        # The Hub's text encoder files spell every key with "text_model." (transformers 5 drops it).
        if not component.startswith("text_encoder") or key.startswith(("text_model.", "text_projection.")):
            shapes[key] = tuple(value.shape)
        else:
            shapes["text_model." + key] = tuple(value.shape)
    version = tuple(int(n) for n in config.get("transformers_version", "0.0").split(".")[:2])
    if component == "text_encoder" and version < (4, 31):
        # Saved before transformers 4.31 made it non-persistent: the SD 1/2 files keep this buffer.
        shapes["text_model.embeddings.position_ids"] = (1, config["max_position_embeddings"])
    return shapes


def random_tensor(key: str, shape: tuple, seed: int):
    """Well-conditioned random values: unit-gain matrices (std 1/sqrt(fan_in)), norms near 1, small biases."""
    import torch

    if key.endswith("position_ids"):
        return torch.arange(shape[-1]).reshape(shape)
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
    x = torch.randn(shape, generator=generator)
    if len(shape) > 1:
        fan_in = 1
        for n in shape[1:]:
            fan_in *= n
        return x / fan_in**0.5
    return x * 0.1 + (1.0 if "norm" in key and key.endswith("weight") else 0.0)


_DTYPES = {"F32": "float32", "F16": "float16", "I64": "int64"}
_SIZES = {"F32": 4, "F16": 2, "I64": 8}


def write_safetensors(paths_and_dtypes: list, shapes: dict, seed: int):
    """Write the same random tensors into several safetensors files (one dtype each), streaming."""
    import torch

    keys = sorted(shapes)
    files = []
    for path, dtype in paths_and_dtypes:
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key in keys:
            kind = "I64" if key.endswith("position_ids") else dtype
            size = _SIZES[kind] * int(torch.Size(shapes[key]).numel())
            header[key] = {"dtype": kind, "shape": list(shapes[key]), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        f = open(path, "wb")
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        files.append((f, dtype))
    try:
        for key in keys:
            x = random_tensor(key, shapes[key], seed)
            for f, dtype in files:
                kind = "I64" if key.endswith("position_ids") else dtype
                f.write(x.to(getattr(torch, _DTYPES[kind])).numpy().tobytes())
    finally:
        for f, _ in files:
            f.close()


def build_weights(arch: str, folder: Path) -> Path:
    """Every weight file of an architecture, under folder/<component>/."""
    for component, files in WEIGHT_FILES[arch].items():
        shapes = parameter_shapes(component, ARCH_CONFIGS[arch][f"{component}/config.json"])
        (folder / component).mkdir(parents=True, exist_ok=True)
        for seed in sorted({seed for _, seed, _ in files}):
            write_safetensors([(folder / component / name, dtype) for name, s, dtype in files if s == seed], shapes, seed)
    return folder


def write_folder(preset: str, folder: Path, vocab_dir: Path, weights_dir: Path = None) -> Path:
    """A preset's folder as its Hub repo lays it out; weights hard-linked from weights_dir (configs only without it)."""
    folder = Path(folder)
    for relative, content in CONFIGS[preset].items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        if preset in SHIPPED:
            shutil.copyfile(CONFIGS_DIR / SHIPPED[preset] / relative, folder / relative)
        else:
            (folder / relative).write_text(json.dumps(content, indent=2) + "\n")
    for tokenizer in ("tokenizer", "tokenizer_2"):
        if (folder / tokenizer).is_dir():
            for name in ("vocab.json", "merges.txt"):
                os.link(Path(vocab_dir) / name, folder / tokenizer / name)
    if weights_dir is not None:
        for component, files in WEIGHT_FILES[ARCH[preset]].items():
            if (folder / component).is_dir():  # vae_1_0 is SDXL base's only
                for name, _, _ in files:
                    os.link(Path(weights_dir) / component / name, folder / component / name)
    return folder


# The two sides of the parity runs, each in its own process; initial latents (NCHW) come from a .npy.
def run_reference(preset: str, folder: Path, init: Path, out: Path):
    """diffusers' pipeline on the folder: final latents (NCHW) and decoded images (NHWC in [0, 1])."""
    import diffusers
    import numpy as np
    import torch

    if "XL" in CONFIGS[preset]["model_index.json"]["_class_name"]:
        # float32 throughout: transformers 5 would otherwise load SDXL's encoders in their config's float16.
        pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False, torch_dtype=torch.float32
        )
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(
        PROMPT,
        negative_prompt=NEGATIVE or None,
        num_inference_steps=STEPS,
        guidance_scale=CFG[preset],
        height=LATENT * 8,
        width=LATENT * 8,
        latents=torch.from_numpy(np.load(init)),
        generator=torch.Generator().manual_seed(NOISE_SEED),
        output_type="latent",
    ).images
    with torch.no_grad():
        images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    images = pipe.image_processor.postprocess(images, output_type="np")
    np.savez(out, latents=latents.numpy(), images=images, scheduler=type(pipe.scheduler).__name__)


def run_ours(preset: str, folder: Path, init: Path, out: Path, decode: bool = True):
    """This package on the folder (float32): final latents (NHWC), images, and which weight files it read."""
    import time

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import mlx.core as mx
    import numpy as np
    from parity import torch_step_noise

    from stable_diffusion import load_model

    loaded, load = [], mx.load

    def recording_load(file, *args, **kwargs):
        loaded.append(os.path.relpath(file, folder))
        return load(file, *args, **kwargs)

    mx.load = recording_load
    start = time.perf_counter()
    sd = load_model(str(folder), float16=False)
    init = mx.array(np.load(init).transpose(0, 2, 3, 1))
    step_noise = torch_step_noise(seed=NOISE_SEED) if sd.sampler.needs_noise else None
    steps = sd.generate_latents(PROMPT, num_steps=STEPS, cfg_weight=CFG[preset], negative_text=NEGATIVE, latents=init, step_noise=step_noise)
    latents = list(steps)[-1]
    mx.eval(latents)
    seconds = [time.perf_counter() - start]
    images = sd.decode(latents) if decode else mx.zeros((0,))
    mx.eval(images)
    seconds.append(time.perf_counter() - start - seconds[0])
    results = dict(latents=np.array(latents), images=np.array(images), loaded=np.array(loaded), sampler=sd.sampler.name, seconds=seconds)
    np.savez(out, **results)


# One call of a single component (a UNet in <folder>/unet/, or a ControlNet folder), each side in its
# own process (tests/test_real_inpaint_controlnet.py). The inputs .npz holds NHWC float32 arrays:
# x, t, context, and as the component takes them image and scale (a ControlNet's control image and
# conditioning scale), text_embeds and time_ids (SDXL's text_time). Outputs: out0, out1, ... (NHWC):
# the UNet's prediction, or the ControlNet's down residuals then its mid residual.
COMPONENTS = ("unet", "controlnet")


def run_component_reference(kind: str, folder: Path, inputs: Path, out: Path):
    """diffusers' UNet2DConditionModel or ControlNetModel, loaded from the folder in float32."""
    import numpy as np
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    a = dict(np.load(inputs))

    def nchw(v):
        return torch.from_numpy(np.ascontiguousarray(v.transpose(0, 3, 1, 2)))

    added = {"text_embeds": torch.from_numpy(a["text_embeds"]), "time_ids": torch.from_numpy(a["time_ids"])} if "time_ids" in a else None
    args = nchw(a["x"]), torch.from_numpy(a["t"]), torch.from_numpy(a["context"])
    with torch.no_grad():
        if kind == "unet":
            model = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)
            outputs = [model(*args, added_cond_kwargs=added, return_dict=False)[0]]
        else:
            model = ControlNetModel.from_pretrained(folder, torch_dtype=torch.float32)
            down, mid = model(*args, nchw(a["image"]), float(a["scale"]), added_cond_kwargs=added, return_dict=False)
            outputs = [*down, mid]
    parameters = sum(p.numel() for p in model.parameters())
    np.savez(out, **{f"out{i}": o.numpy().transpose(0, 2, 3, 1) for i, o in enumerate(outputs)}, parameters=parameters)


def run_component_ours(kind: str, folder: Path, inputs: Path, out: Path):
    """This package's loader and model (float32): the outputs, the load's peak memory
    (``mx.get_peak_memory()`` once every parameter is evaluated, in this fresh process), the
    parameters' bytes, count and largest tensor, and the seconds of the load and of the call."""
    import time

    sys.path[:0] = [str(ROOT)]
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    from stable_diffusion import load_controlnet, model_io
    from stable_diffusion.config import UNetConfig
    from stable_diffusion.unet import UNetModel

    a = dict(np.load(inputs))
    start = time.perf_counter()
    if kind == "unet":
        model = model_io.load_component(model_io.FolderSource(folder), "unet", UNetModel, UNetConfig)
    else:
        model = load_controlnet(str(folder), float16=False)
    parameters = [v for _, v in tree_flatten(model.parameters())]
    mx.eval(parameters)
    seconds = [time.perf_counter() - start]
    peak = mx.get_peak_memory()
    text_time = (mx.array(a["text_embeds"]), mx.array(a["time_ids"])) if "time_ids" in a else None
    x, t, context = mx.array(a["x"]), mx.array(a["t"]), mx.array(a["context"])
    if kind == "unet":
        outputs = [model(x, t, context, text_time)]
    else:
        down, mid = model(x, t, context, mx.array(a["image"]), float(a["scale"]), text_time)
        outputs = [*down, mid]
    mx.eval(outputs)
    seconds.append(time.perf_counter() - start - seconds[0])
    np.savez(
        out,
        **{f"out{i}": np.array(o) for i, o in enumerate(outputs)},
        peak=peak,
        weights=sum(v.nbytes for v in parameters),
        largest=max(v.nbytes for v in parameters),
        parameters=sum(v.size for v in parameters),
        seconds=seconds,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("weights", help="write every weight file of an architecture")
    p.add_argument("arch", choices=sorted(WEIGHT_FILES))
    p.add_argument("folder", type=Path)
    p = sub.add_parser("folder", help="write a preset's folder, hard-linking the weights")
    p.add_argument("preset", choices=PRESETS)
    p.add_argument("folder", type=Path)
    p.add_argument("--weights", type=Path, required=True, help="the folder `weights` wrote for the preset's architecture")
    p.add_argument("--vocab", type=Path, required=True, help="a folder with vocab.json and merges.txt")
    for command in ("reference", "ours"):
        p = sub.add_parser(command, help=f"run {'diffusers' if command == 'reference' else 'this package'} on a preset folder")
        p.add_argument("preset", choices=PRESETS)
        p.add_argument("folder", type=Path)
        p.add_argument("init", type=Path, help="initial latents, (1, 4, h, w) float32 .npy")
        p.add_argument("out", type=Path, help="results .npz")
    p.add_argument("--no-decode", action="store_true", help="compare the latents only")
    for command in ("component-reference", "component-ours"):
        p = sub.add_parser(command, help=f"one call of a UNet or ControlNet folder with {'diffusers' if command == 'component-reference' else 'this package'}")
        p.add_argument("kind", choices=COMPONENTS)
        p.add_argument("folder", type=Path, help="a folder holding unet/ (kind unet), or a ControlNet folder")
        p.add_argument("inputs", type=Path, help="inputs .npz (NHWC float32)")
        p.add_argument("out", type=Path, help="results .npz")
    args = parser.parse_args()
    if args.command == "weights":
        build_weights(args.arch, args.folder)
    elif args.command == "folder":
        write_folder(args.preset, args.folder, args.vocab, args.weights)
    elif args.command == "reference":
        run_reference(args.preset, args.folder, args.init, args.out)
    elif args.command == "component-reference":
        run_component_reference(args.kind, args.folder, args.inputs, args.out)
    elif args.command == "component-ours":
        run_component_ours(args.kind, args.folder, args.inputs, args.out)
    else:
        run_ours(args.preset, args.folder, args.init, args.out, decode=not args.no_decode)


if __name__ == "__main__":
    main()
