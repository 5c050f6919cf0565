"""Turn an image into another guided by a prompt (img2img), and watch the denoising happen.

    python image2image.py --strength 0.5 original.png 'A lit fireplace'
    python image2image.py --steps 200 -sd 20 -gt original.png 'A lit fireplace'   # then TriangularArray.py out.png

Interim images are written beside the output as ``<base>_<limit>_<count>.<ext>``: ``limit`` is the
number of steps the run makes (``int(steps * strength)``) and ``count`` the steps done so far, so
``<base>_<limit>_<limit>`` is that run's final image and ``<base>_0_0`` the (resized) input.
"""

import sys

import numpy as np

from stable_diffusion import cli, images, img2img_steps
from stable_diffusion.cli import UsageError

DEFAULT_STRENGTH = 0.8
TRIANGLE_STRENGTHS = [round(0.1 * k, 1) for k in range(1, 11)]


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog="image2image.py", description="Transform an image with a text prompt (img2img) with Stable Diffusion in MLX.")
    parser.add_argument("image", help="the input image (any format PIL reads; converted to RGB, EXIF orientation applied)")
    cli.add_common_arguments(parser)
    parser.add_argument("--strength", type=float, default=None, help=f"how much to change the image, in (0, 1]: int(steps * strength) steps are run (default {DEFAULT_STRENGTH})")
    parser.add_argument("--no-resize", dest="resize", action="store_false", help="refuse an input whose sides are not multiples of the VAE factor (8 px for real models) instead of shrinking it")
    parser.add_argument("-sd", "--show_denoising", type=int, default=None, metavar="N", help="every N steps, decode the current latent and save the grid as <base>_<limit>_<count>.<ext> (the final step is always saved too)")
    parser.add_argument("--save_last_N", type=int, default=0, metavar="N", help="also save the grids of the last N steps before the final one, named as for -sd")
    parser.add_argument("-gt", "--generate_triangle", action="store_true", help="run strengths 0.1, 0.2, ..., 1.0 with the models loaded once, saving each run's interim and final grids (no <base>.<ext>); compose them with TriangularArray.py")
    return parser.parse_args(argv)


def check_steps(steps: int, strengths: list[float], triangle: bool):
    for strength in strengths:
        if img2img_steps(steps, strength) < 1:
            if triangle:
                raise UsageError(f"-gt runs strength {strength:g}, which needs --steps of at least {int(np.ceil(1 / strength))} (got {steps})")
            raise UsageError(f"--steps {steps} x --strength {strength:g} leaves no denoising step; raise --steps or --strength")


def counts_to_save(limit: int, every: int | None, last_n: int, triangle: bool) -> set[int]:
    """Which step counts of a run of ``limit`` steps get an interim file."""
    counts = set()
    if every:
        counts |= set(range(every, limit + 1, every)) | {limit}
    if last_n:
        counts |= set(range(max(1, limit - last_n), limit))
    if triangle:
        counts.add(limit)
    return counts


def files_to_write(output, args, steps: int, strengths: list[float]) -> list:
    """Every file this run will write, so that none is a directory or the input (checked before generating)."""
    files = [] if args.generate_triangle else [output]
    if args.save_individual and not args.generate_triangle:
        files += [images.sibling(output, i) for i in range(1, args.n_images + 1)]
    if args.show_denoising or args.save_last_N or args.generate_triangle:
        files.append(images.sibling(output, 0, 0))
        for strength in strengths:
            limit = img2img_steps(steps, strength)
            for count in sorted(counts_to_save(limit, args.show_denoising, args.save_last_N, args.generate_triangle)):
                files.append(images.sibling(output, limit, count))
                if args.generate_triangle and args.save_individual and count == limit:
                    files += [images.sibling(images.sibling(output, limit, limit), i) for i in range(1, args.n_images + 1)]
    return files


def main(argv=None):
    args = parse_args(argv)
    output = cli.check_common_arguments(args)
    if args.generate_triangle and args.strength is not None:
        print("image2image.py: warning: -gt runs strengths 0.1 to 1.0; --strength is ignored", file=sys.stderr)
    strength = DEFAULT_STRENGTH if args.strength is None else args.strength
    if not 0 < strength <= 1:
        raise UsageError(f"--strength must be in (0, 1] (got {strength:g})")
    if args.show_denoising is not None and args.show_denoising < 1:
        raise UsageError(f"-sd/--show_denoising must be at least 1 (got {args.show_denoising})")
    if args.save_last_N < 0:
        raise UsageError(f"--save_last_N must be >= 0 (got {args.save_last_N})")
    strengths = TRIANGLE_STRENGTHS if args.generate_triangle else [strength]
    if args.steps is not None:
        check_steps(args.steps, strengths, args.generate_triangle)
    picture = cli.read_image(args.image)
    # The configs only: size, steps, memory and every file name are checked before any weight is read or downloaded.
    model, _ = cli.check_before_loading(args, picture_size=picture.size)
    cli.check_written_paths(files_to_write(output, args, model.steps(args), strengths), inputs=[args.image])

    sd = cli.load(args)
    steps, cfg = cli.steps_and_cfg(args, sd)
    check_steps(steps, strengths, args.generate_triangle)
    try:
        resized = images.resize_to_multiple(picture, sd.latent_factor, args.resize)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if resized.size != picture.size:
        w, h = picture.size
        print(f"resizing the input image from {w}x{h} to {resized.size[0]}x{resized.size[1]} (multiples of {sd.latent_factor} px)", file=sys.stderr)
    picture = resized
    size = picture.size
    init = images.to_model_input(picture)
    seed = cli.draw_seed(args.seed)

    interim = bool(args.show_denoising or args.save_last_N or args.generate_triangle)
    written = []
    if interim:  # the input as tile <base>_0_0, in the same grid as the outputs
        path = images.sibling(output, 0, 0)
        inputs = np.stack([np.asarray(picture)] * args.n_images)
        cli.save_grid(inputs, path, args.n_rows, cli.parameters(args, sd, steps, cfg, seed, size, Strength=0))
        written.append(path)

    for strength in strengths:
        limit = img2img_steps(steps, strength)
        keep = counts_to_save(limit, args.show_denoising, args.save_last_N, args.generate_triangle)
        params = lambda count: cli.parameters(  # noqa: E731
            args,
            sd,
            steps,
            cfg,
            seed,
            size,
            Strength=f"{strength:g}",
            Denoising_step=f"{count}/{limit}" if count < limit else None,
            Show_denoising=args.show_denoising,
        )
        latents = sd.generate_latents_from_image(
            init,
            args.prompt,
            n_images=args.n_images,
            strength=strength,
            num_steps=steps,
            cfg_weight=cfg,
            negative_text=args.negative_prompt,
            seed=seed,
        )
        pictures = None
        for count, x_t in cli.denoise(latents, limit, desc=f"strength {strength:g}"):
            pictures = None
            if count in keep:
                pictures = cli.decode(sd, x_t, args.decoding_batch_size)
                path = images.sibling(output, limit, count)
                cli.save_grid(pictures, path, args.n_rows, params(count), args.save_prompt and count == limit)
                written.append(path)
        cli.report_memory(args, f"strength {strength:g}")
        if pictures is None:  # the final step was not saved as an interim file
            pictures = cli.decode(sd, x_t, args.decoding_batch_size)
        if args.generate_triangle:
            if args.save_individual:
                cli.save_individual(pictures, images.sibling(output, limit, limit), params(limit))
            continue
        cli.save_grid(pictures, output, args.n_rows, params(limit), args.save_prompt)
        if args.save_individual:
            cli.save_individual(pictures, output, params(limit))
        written.append(output)

    if args.generate_triangle:
        print(f"saved {len(written)} files {images.sibling(output, '<limit>', '<count>')}; compose them with: python TriangularArray.py {output}")
    else:
        extra = f" and {len(written) - 1} interim files" if len(written) > 1 else ""
        print(f"saved {output}{extra}")


if __name__ == "__main__":
    cli.run_cli(main, "image2image.py")
