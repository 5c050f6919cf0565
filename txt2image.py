"""Generate images from a text prompt and save them as one PNG grid.

    python txt2image.py "A photo of an astronaut riding a horse on Mars." --n_images 4 --n_rows 2

The flags shared with image2image.py (model, sampling, output, metadata) live in stable_diffusion/cli.py.
"""

import sys
import time

from stable_diffusion import cli, images
from stable_diffusion.cli import UsageError


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog="txt2image.py", description="Generate images from a text prompt with Stable Diffusion in MLX.")
    cli.add_common_arguments(parser)
    parser.add_argument("--width", type=int, default=None, help="image width in px, a multiple of the VAE factor (8 px for real models; default: the model's native size)")
    parser.add_argument("--height", type=int, default=None, help="image height in px, a multiple of the VAE factor (8 px for real models; default: the model's native size)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    output = cli.check_common_arguments(args)
    for flag in ("width", "height"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be positive (got {value})")
    # The configs only: size, steps and memory are checked before any weight is read or downloaded.
    cli.check_before_loading(args, args.width, args.height)
    if args.save_individual:
        cli.check_written_paths([output, *(images.sibling(output, i) for i in range(1, args.n_images + 1))])

    sd = cli.load(args)
    steps, cfg = cli.steps_and_cfg(args, sd)
    f = sd.latent_factor
    default_h, default_w = (s * f for s in sd.defaults.latent_size)
    width = default_w if args.width is None else args.width
    height = default_h if args.height is None else args.height
    for flag, value in (("width", width), ("height", height)):
        if value % f:
            raise UsageError(f"--{flag} {value} is not a multiple of {f} (this model's VAE factor)")
    seed = cli.draw_seed(args.seed)

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
    for _, x_t in cli.denoise(latents, steps):
        pass
    cli.report_memory(args, "denoising")
    pictures = cli.decode(sd, x_t, args.decoding_batch_size)
    cli.report_memory(args, "decoding")
    if args.verbose:
        print(f"generated in {time.perf_counter() - start:.2f} s", file=sys.stderr)

    params = cli.parameters(args, sd, steps, cfg, seed, (width, height))
    cli.save_grid(pictures, output, args.n_rows, params, args.save_prompt)
    if args.save_individual:
        cli.save_individual(pictures, output, params)
    print(f"saved {output}")


if __name__ == "__main__":
    cli.run_cli(main, "txt2image.py")
