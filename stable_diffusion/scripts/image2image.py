"""Turn an image into another guided by a prompt (img2img), and watch the denoising happen.

    sd-image2image --strength 0.5 original.png 'A lit fireplace'     # or: python image2image.py ... from a clone
    sd-image2image --steps 200 -sd 20 -gt original.png 'A lit fireplace'   # then: sd-triangle out.png

Interim images are written beside the output as ``<base>_<limit>_<count>.<ext>``: ``limit`` is the
number of UNet calls the run makes (its ``int(steps * strength)`` steps; a 2nd-order sampler such
as Heun makes about two calls a step) and ``count`` the calls done so far, so
``<base>_<limit>_<limit>`` is that run's final image and ``<base>_0_0`` the (resized) input.
"""

import sys

import numpy as np

from .. import cli, distributed, images, img2img_steps, interruptible
from ..cli import UsageError

# The installed command; the clone's image2image.py runs the same code under its own name.
PROG = "sd-image2image"
DEFAULT_STRENGTH = 0.8
TRIANGLE_STRENGTHS = [round(0.1 * k, 1) for k in range(1, 11)]


def parse_args(argv=None, prog: str = PROG):
    parser = cli.ArgumentParser(prog=prog, description="Transform an image with a text prompt (img2img) with Stable Diffusion in MLX.")
    parser.add_argument("image", nargs="?", default=None, help="the input image (any format PIL reads; converted to RGB, EXIF orientation applied); with --images leave it out")
    cli.add_common_arguments(parser)
    parser.add_argument("--images", default=None, metavar="FILE", help="a text file of input images, one path a line: --n_images (or --seeds) images each, saved as <base>_<k>.<ext>")
    parser.add_argument("--strength", type=float, default=None, help=f"how much to change the image, in (0, 1]: int(steps * strength) steps are run (default {DEFAULT_STRENGTH})")
    parser.add_argument("--no-resize", dest="resize", action="store_false", help="refuse an input whose sides are not multiples of the VAE factor (8 px for real models) instead of shrinking it")
    parser.add_argument("-sd", "--show_denoising", type=int, default=None, metavar="N", help="every N UNet calls (steps, for a 1st-order sampler), decode the current latent and save the grid as <base>_<limit>_<count>.<ext> (the final one is always saved too)")
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
    if last_n:  # and the final step, as -sd saves it: TriangularArray.py composes a row from these files
        counts |= set(range(max(1, limit - last_n), limit)) | {limit}
    if triangle:
        counts.add(limit)
    return counts


def files_to_write(output, args, steps: int, strengths: list[float], n_inputs: int, calls) -> list:
    """Every file this run will write, so that none is a directory or an input (checked before generating).

    ``calls(steps, strength)``: the UNet calls of a run, which number its interim files."""
    if cli.is_batch(args):
        n = n_inputs * (len(args.seed_list) if args.seed_list else args.n_images)
        return [output, *(images.sibling(output, k) for k in range(1, n + 1))]
    files = [] if args.generate_triangle else [output]
    if args.save_individual and not args.generate_triangle:
        files += [images.sibling(output, i) for i in range(1, args.n_images + 1)]
    if args.show_denoising or args.save_last_N or args.generate_triangle:
        files.append(images.sibling(output, 0, 0))
        for strength in strengths:
            limit = calls(steps, strength)
            for count in sorted(counts_to_save(limit, args.show_denoising, args.save_last_N, args.generate_triangle)):
                files.append(images.sibling(output, limit, count))
                if args.generate_triangle and args.save_individual and count == limit:
                    files += [images.sibling(images.sibling(output, limit, limit), i) for i in range(1, args.n_images + 1)]
    return files


def main(argv=None, prog: str = PROG):
    args = parse_args(argv, prog)
    group = distributed.Group()  # first: every rank of mlx.launch connects before any can stop
    if args.images is not None and args.prompt is None:  # `--images FILE 'a prompt'`: the one positional is the prompt
        args.image, args.prompt = None, args.image
    output = cli.check_common_arguments(args)
    if args.prompt is None or (args.image is None) == (args.images is None):
        raise UsageError("give an input image and a prompt, or --images FILE and a prompt")
    if args.generate_triangle and args.strength is not None:
        print(f"{prog}: warning: -gt runs strengths 0.1 to 1.0; --strength is ignored", file=sys.stderr)
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
    interim = bool(args.show_denoising or args.save_last_N or args.generate_triangle)
    if interim and (cli.is_batch(args) or group.distributed or args.resume):
        raise UsageError("-sd, --save_last_N and -gt run one image in one process: not with --images, --seeds, --resume or mlx.launch")
    try:
        paths = [args.image] if args.images is None else distributed.read_list(args.images, "--images")
    except ValueError as e:
        raise UsageError(str(e)) from None
    originals = [cli.read_image(path) for path in paths]
    cli.check_prompt_loras([args.prompt], args)
    # The configs only: size, steps, memory and every file name are checked before any weight is read or downloaded.
    largest = max(originals, key=lambda picture: picture.size[0] * picture.size[1])
    model, _ = cli.check_before_loading(args, picture_size=largest.size, n_sources=len(paths), one_batch=interim)
    cli.check_written_paths(files_to_write(output, args, model.steps(args), strengths, len(paths), model.calls), inputs=paths)

    sd = cli.load(args)
    steps, cfg = cli.steps_and_cfg(args, sd)
    check_steps(steps, strengths, args.generate_triangle)
    if group.rank == 0:
        cli.report_prompt(args, sd, args.prompt, steps, cfg)
    resized = []
    for path, picture in zip(paths, originals):
        try:
            new = images.resize_to_multiple(picture, sd.latent_factor, args.resize)
        except ValueError as e:
            raise UsageError(f"{path}: {e}" if len(paths) > 1 else str(e)) from None
        if new.size != picture.size and group.rank == 0:
            (w, h), name = picture.size, f" {path}" if len(paths) > 1 else ""
            print(f"resizing the input image{name} from {w}x{h} to {new.size[0]}x{new.size[1]} (multiples of {sd.latent_factor} px)", file=sys.stderr)
        resized.append(new)
    picture = resized[0]
    size = picture.size
    init = images.to_model_input(picture)
    seed = None if args.seed_list else group.broadcast_seed(lambda: cli.draw_seed(args.seed))
    seeds = args.seed_list or distributed.seeds_for(seed, args.n_images)
    if not interim:
        return run_job(args, group, sd, output, resized, seeds, steps, cfg, strength, prog)

    noise_shape = (size[1] // sd.latent_factor, size[0] // sd.latent_factor, sd.autoencoder.config.latent_channels)
    written = []
    if interim:  # the input as tile <base>_0_0, in the same grid as the outputs
        path = images.sibling(output, 0, 0)
        inputs = np.stack([np.asarray(picture)] * args.n_images)
        cli.save_grid(inputs, path, args.n_rows, cli.parameters(args, sd, steps, cfg, seed, size, Denoising_strength=0))
        written.append(path)

    for strength in strengths:
        limit = sd.denoising_calls(steps, strength)
        keep = counts_to_save(limit, args.show_denoising, args.save_last_N, args.generate_triangle)
        params = lambda count: cli.parameters(  # noqa: E731
            args,
            sd,
            steps,
            cfg,
            seed,
            size,
            Denoising_strength=f"{strength:g}",
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
            noise=distributed.initial_noise(seeds, noise_shape),  # image j: seed + j, as in a run without -sd/-gt
            step_noise=distributed.step_noise(seeds, sd.denoising_calls(steps)),
            **cli.prompt_options(args),
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
        compose = "sd-triangle" if prog == PROG else "python TriangularArray.py"  # the installed command, or the clone's script
        print(f"saved {len(written)} files {images.sibling(output, '<limit>', '<count>')}; compose them with: {compose} {output}")
    else:
        extra = f" and {len(written) - 1} interim files" if len(written) > 1 else ""
        print(f"saved {output}{extra}")


def run_job(args, group, sd, output, pictures, seeds, steps, cfg, strength, prog: str = PROG):
    """Every (input image, seed) pair, one file each (a batch job) or one grid, split over the ranks."""
    batch = cli.is_batch(args)
    items = distributed.make_items(len(pictures), seeds)
    sizes = {p.size for p in pictures}
    if batch and args.grid and len(sizes) > 1:
        raise UsageError(f"--grid needs input images of one size (after resizing); got {', '.join(f'{w}x{h}' for w, h in sorted(sizes))}")
    if batch and args.grid and len(items) % args.n_rows:
        raise UsageError(f"--n_rows {args.n_rows} does not divide the {len(items)} images of the grid")
    inits = [images.to_model_input(p) for p in pictures]
    f = sd.latent_factor

    def generate(chunk):
        seeds = [it.seed for it in chunk]
        w, h = pictures[chunk[0].source].size
        latents = sd.generate_latents_from_image(
            inits[chunk[0].source],
            args.prompt,
            n_images=len(chunk),
            strength=strength,
            num_steps=steps,
            cfg_weight=cfg,
            negative_text=args.negative_prompt,
            noise=distributed.initial_noise(seeds, (h // f, w // f, sd.autoencoder.config.latent_channels)),
            step_noise=distributed.step_noise(seeds, sd.denoising_calls(steps)),
            **cli.prompt_options(args),
        )
        return interruptible.steps(latents)  # Ctrl-C and SIGTERM act within a step

    def parameters(item, n):
        position = {} if batch else {"Batch_size": n, "Batch_pos": item.pos}
        return cli.parameters(args, sd, steps, cfg, item.seed, pictures[item.source].size, Denoising_strength=f"{strength:g}", **position)

    job = distributed.Job(
        prog=prog,
        items=items,
        batch_size=args.batch_size,
        output=output,
        generate=generate,
        steps=sd.denoising_calls(steps, strength),
        decode=lambda x: cli.decode(sd, x, args.decoding_batch_size),
        parameters=parameters,
        individual=batch or args.save_individual,
        image_size=pictures[0].size,
        grid_rows=args.n_rows if args.grid or not batch else None,
        grid_parameters=cli.parameters(args, sd, steps, cfg, seeds[0], pictures[0].size, Denoising_strength=f"{strength:g}"),
        resume=args.resume,
        verbose=args.verbose,
    )
    written = distributed.run(job, group)
    if group.rank == 0:
        cli.report_job(args, job, written, f"strength {strength:g}")


def run(prog: str = PROG):
    """The command's entry point: errors are one line on stderr prefixed with ``prog``, exit status 2."""
    cli.run_cli(lambda: main(prog=prog), prog)


if __name__ == "__main__":
    run()
