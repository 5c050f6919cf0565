"""Generate images from a text prompt and save them as one PNG grid.

    python txt2image.py "A photo of an astronaut riding a horse on Mars." --n_images 4 --n_rows 2

The flags shared with image2image.py (model, sampling, output, metadata) are defined here.
"""

import secrets
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from stable_diffusion import PRESETS, load_model
from stable_diffusion import images
from stable_diffusion.images import UsageError
from stable_diffusion.sampler import SAMPLERS

DEFAULT_MODEL = "sdxl-turbo"

# A1111's sampler names, so that its PNG Info and Civitai recognise ours.
SAMPLER_LABELS = {"euler": "Euler", "euler_a": "Euler a", "ddim": "DDIM", "dpm++2m": "DPM++ 2M"}


def add_common_arguments(parser):
    """The flags txt2image.py and image2image.py share."""
    presets = ", ".join(PRESETS)
    parser.add_argument("prompt", help="what the image should show")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a preset ({presets}), a Hugging Face repo id (owner/name) or a local diffusers folder",
    )
    parser.add_argument("--n_images", type=int, default=1, help="how many images to generate (one batch)")
    parser.add_argument("--n_rows", type=int, default=1, help="rows of the output grid; must divide --n_images")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, 2 for turbo models, else 50)")
    parser.add_argument("--cfg", type=float, default=None, help="classifier-free guidance weight; <= 1 turns guidance off (default: the model's, 0 for turbo, else 7.5)")
    parser.add_argument("--negative_prompt", default="", help="what the image should not show (used when --cfg > 1)")
    parser.add_argument("--sampler", default=None, choices=list(SAMPLERS), help="sampler (default: the model's own scheduler when implemented, else euler)")
    parser.add_argument("--seed", type=int, default=None, help="random seed; drawn and printed when not given, and always stored in the PNG")
    parser.add_argument("--no-float16", dest="float16", action="store_false", help="run the text encoder and UNet in float32 (float16 is the default; the VAE stays float32)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize the text encoders to 4 bits and the UNet's linear layers to 8 bits")
    parser.add_argument("--preload-models", action="store_true", help="read all weights before generating instead of at first use")
    parser.add_argument("--decoding_batch_size", type=int, default=1, help="how many latents the VAE decodes at once")
    parser.add_argument("-o", "--output", default="out.png", help="output file (.png, .jpg, .jpeg or .webp; only PNG stores the parameters)")
    parser.add_argument("--save_individual", action="store_true", help="also save each image as <base>_<i>.<ext> beside the grid")
    parser.add_argument("-sp", "--save_prompt", action="store_true", help="print the parameters stored in the PNG, read back from the file")
    parser.add_argument("-pp", "--print_parser", action="store_true", help="print the parsed arguments at start")
    parser.add_argument("-v", "--verbose", action="store_true", help="print timings and peak memory (mx.get_peak_memory)")


def parse_args(argv=None):
    parser = images.ArgumentParser(prog="txt2image.py", description="Generate images from a text prompt with Stable Diffusion in MLX.")
    add_common_arguments(parser)
    parser.add_argument("--width", type=int, default=None, help="image width in px, a multiple of 8x the VAE factor (64 for real models; default: the model's native size)")
    parser.add_argument("--height", type=int, default=None, help="image height in px, a multiple of 8x the VAE factor (64 for real models; default: the model's native size)")
    return parser.parse_args(argv)


def check_common_arguments(args) -> Path:
    """Every check that needs no model; returns the output path."""
    if args.print_parser:
        print(args)
    if args.n_images < 1:
        raise UsageError(f"--n_images must be at least 1 (got {args.n_images})")
    if args.n_rows < 1 or args.n_images % args.n_rows:
        raise UsageError(f"--n_rows {args.n_rows} does not divide --n_images {args.n_images}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1 (got {args.steps})")
    if args.cfg is not None and not args.cfg >= 0:
        raise UsageError(f"--cfg must be >= 0 (got {args.cfg})")
    if args.decoding_batch_size < 1:
        raise UsageError(f"--decoding_batch_size must be at least 1 (got {args.decoding_batch_size})")
    check_model_name(args.model)
    return images.check_output_path(args.output)


def check_model_name(model: str):
    if model in PRESETS or Path(model).expanduser().is_dir():
        return
    if model.startswith((".", "/", "~")) or "\\" in model:
        raise UsageError(f"--model {model!r}: no such folder")
    if model.count("/") != 1:
        raise UsageError(
            f"unknown model {model!r}: use a preset ({', '.join(PRESETS)}), a Hugging Face repo id (owner/name) or a local diffusers folder"
        )


def draw_seed(seed):
    if seed is None:
        seed = secrets.randbelow(2**31)
        print(f"seed: {seed} (pass --seed {seed} to make this image again)")
    return seed


def load(args):
    """The facade for --model, quantized and preloaded as asked."""
    start = time.perf_counter()
    try:
        sd = load_model(args.model, float16=args.float16, sampler=args.sampler)
    except ValueError as e:  # an unsupported config value or sampler name
        raise UsageError(f"--model {args.model!r}: {e}") from None
    if args.quantize:
        sd.quantize(text_bits=4, unet_bits=8)
    if args.preload_models:
        sd.ensure_models_are_loaded()
    if args.verbose:
        print(f"model loaded in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return sd


def steps_and_cfg(args, sd):
    steps = sd.default_steps if args.steps is None else args.steps
    cfg = sd.default_cfg if args.cfg is None else args.cfg
    most = sd.sampler.config.num_train_timesteps
    if steps > most:
        raise UsageError(f"--steps {steps} is more than the model's {most} training timesteps")
    return steps, cfg


def sampler_label(args, sd) -> str:
    label = SAMPLER_LABELS[sd.sampler.name]
    return f"{label} Karras" if sd.sampler.config.use_karras_sigmas else label


def parameters(args, sd, steps, cfg, seed, size, **extra) -> str:
    """The A1111 parameters text for this run; ``size`` is (width, height) of one image."""
    return images.format_parameters(
        args.prompt,
        args.negative_prompt,
        Steps=steps,
        Sampler=sampler_label(args, sd),
        CFG_scale=f"{cfg:g}",
        Seed=seed,
        Size=f"{size[0]}x{size[1]}",
        Model=args.model,
        **extra,
    )


def denoise(latents, total: int, desc: str = "denoising"):
    """Evaluate each step's latent under a tqdm bar, yielding (step count, latent)."""
    for count, x_t in enumerate(tqdm(latents, total=total, desc=desc, leave=False), start=1):
        mx.eval(x_t)
        yield count, x_t


def decode(sd, x, batch_size: int, desc: str = "decoding"):
    """Latents -> (N, H, W, 3) uint8, ``batch_size`` latents at a time."""
    chunks = []
    for i in tqdm(range(0, x.shape[0], batch_size), desc=desc, leave=False):
        chunk = sd.decode(x[i : i + batch_size], batch_size=batch_size)
        mx.eval(chunk)
        if mx.isnan(chunk).any().item():
            print(f"warning: the decoded image {i} contains NaN (drawn black); try --no-float16", file=sys.stderr)
        chunks.append(images.to_uint8(chunk))
    return np.concatenate(chunks)


def save_grid(pictures, path: Path, n_rows: int, params: str, save_prompt: bool = False):
    images.save_image(images.grid(pictures, n_rows), path, params)
    if save_prompt:
        print_stored_parameters(path)
    return path


def save_individual(pictures, path: Path, params: str):
    for i, picture in enumerate(pictures, start=1):
        batch = f", Batch size: {len(pictures)}, Batch pos: {i - 1}"
        images.save_image(picture, images.sibling(path, i), params + batch)


def print_stored_parameters(path: Path):
    if images.FORMATS[path.suffix.lower()] != "PNG":
        print(f"{path}: {path.suffix} files carry no parameters; use .png to store the prompt")
        return
    print(f"parameters stored in {path}:\n{images.read_parameters(path)}")


def report_memory(args, what: str):
    if args.verbose:
        print(f"peak memory after {what}: {mx.get_peak_memory() / 2**30:.3f} GB", file=sys.stderr)
        mx.reset_peak_memory()


def main(argv=None):
    args = parse_args(argv)
    output = check_common_arguments(args)
    for flag in ("width", "height"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be positive (got {value})")

    sd = load(args)
    steps, cfg = steps_and_cfg(args, sd)
    f = sd.latent_factor
    multiple = 8 * f
    default_h, default_w = (s * f for s in sd.default_latent_size)
    width = default_w if args.width is None else args.width
    height = default_h if args.height is None else args.height
    for flag, value in (("width", width), ("height", height)):
        if value % multiple:
            raise UsageError(f"--{flag} {value} is not a multiple of {multiple} (8x this model's VAE factor {f})")
    seed = draw_seed(args.seed)

    start = time.perf_counter()
    latents = sd.generate_latents(
        args.prompt,
        n_images=args.n_images,
        num_steps=steps,
        cfg_weight=cfg,
        negative_text=args.negative_prompt,
        latent_size=(height // f, width // f),
        seed=seed,
    )
    for _, x_t in denoise(latents, steps):
        pass
    report_memory(args, "denoising")
    pictures = decode(sd, x_t, args.decoding_batch_size)
    report_memory(args, "decoding")
    if args.verbose:
        print(f"generated in {time.perf_counter() - start:.2f} s", file=sys.stderr)

    params = parameters(args, sd, steps, cfg, seed, (width, height))
    save_grid(pictures, output, args.n_rows, params, args.save_prompt)
    if args.save_individual:
        save_individual(pictures, output, params)
    print(f"saved {output}")


if __name__ == "__main__":
    images.run_cli(main, "txt2image.py")
