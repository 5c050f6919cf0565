"""Generate images from a text prompt and save them as one PNG grid.

    sd-txt2image "A photo of an astronaut riding a horse on Mars." --n_images 4 --n_rows 2
    python txt2image.py ...      # the same, from a clone

The flags shared with image2image (model, sampling, output, metadata) live in stable_diffusion/cli.py.
"""

from .. import cli, distributed, images, interruptible
from ..cli import UsageError

# The installed command; the clone's txt2image.py runs the same code under its own name.
PROG = "sd-txt2image"


def parse_args(argv=None, prog: str = PROG):
    parser = cli.ArgumentParser(prog=prog, description="Generate images from a text prompt with Stable Diffusion in MLX.")
    cli.add_common_arguments(parser)
    parser.add_argument("--prompts", default=None, metavar="FILE", help="a text file of prompts, one a line: --n_images (or --seeds) images each, saved as <base>_<k>.<ext>")
    parser.add_argument("--width", type=int, default=None, help="image width in px, a multiple of the VAE factor (8 px for real models; default: the model's native size)")
    parser.add_argument("--height", type=int, default=None, help="image height in px, a multiple of the VAE factor (8 px for real models; default: the model's native size)")
    return parser.parse_args(argv)


def main(argv=None, prog: str = PROG):
    args = parse_args(argv, prog)
    group = distributed.Group()  # first: every rank of mlx.launch connects before any can stop
    output = cli.check_common_arguments(args)
    if (args.prompt is None) == (args.prompts is None):
        raise UsageError("give a prompt or --prompts FILE" if args.prompt is None else "give a prompt or --prompts FILE, not both")
    try:
        prompts = [args.prompt] if args.prompts is None else distributed.read_list(args.prompts, "--prompts")
    except ValueError as e:
        raise UsageError(str(e)) from None
    cli.check_prompt_loras(prompts, args)
    for flag in ("width", "height"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UsageError(f"--{flag} must be positive (got {value})")
    # The configs only: size, steps and memory are checked before any weight is read or downloaded.
    model, _ = cli.check_before_loading(args, args.width, args.height, n_sources=len(prompts))
    if model.inpainting:
        raise UsageError(f"--model {args.model!r} is an inpainting model (its UNet reads a mask): use image2image.py with --mask")
    inputs = [spec.image for spec in args.controls]
    if args.save_individual and not cli.is_batch(args):
        cli.check_written_paths([output, *(images.sibling(output, i) for i in range(1, args.n_images + 1))], inputs)
    elif cli.is_batch(args):
        n = len(prompts) * (len(args.seed_list) if args.seed_list else args.n_images)
        cli.check_written_paths([output, *(images.sibling(output, k) for k in range(1, n + 1))], inputs)
    else:
        cli.check_written_paths([output], inputs)

    sd = cli.load(args)
    steps, cfg = cli.steps_and_cfg(args, sd)
    calls = sd.denoising_calls(steps)  # the latents the generator yields: more than steps for a 2nd-order sampler
    if group.rank == 0:
        for prompt in dict.fromkeys(prompts):
            cli.report_prompt(args, sd, prompt, steps, cfg)
    f = sd.latent_factor
    default_h, default_w = (s * f for s in sd.defaults.latent_size)
    width = default_w if args.width is None else args.width
    height = default_h if args.height is None else args.height
    for flag, value in (("width", width), ("height", height)):
        if value % f:
            raise UsageError(f"--{flag} {value} is not a multiple of {f} (this model's VAE factor)")
    seeds = args.seed_list or distributed.seeds_for(group.broadcast_seed(lambda: cli.draw_seed(args.seed)), args.n_images)
    items = distributed.make_items(len(prompts), seeds)
    batch = cli.is_batch(args)
    if batch and args.grid and len(items) % args.n_rows:
        raise UsageError(f"--n_rows {args.n_rows} does not divide the {len(items)} images of the grid")
    latent_shape = (height // f, width // f, sd.unet.config.in_channels)
    controls = cli.controls_for(args, width, height)
    cli.check_controls(sd, controls, width, height)

    def generate(chunk):
        seeds = [it.seed for it in chunk]
        try:
            latents = sd.generate_latents(
                prompts[chunk[0].source],
                n_images=len(chunk),
                num_steps=steps,
                cfg_weight=cfg,
                negative_text=args.negative_prompt,
                latents=distributed.initial_noise(seeds, latent_shape),
                step_noise=distributed.step_noise(seeds, calls),
                controls=controls,
                guess_mode=args.guess_mode,
                **cli.prompt_options(args),
            )
        except ValueError as e:
            raise cli.refused(e) from None
        return interruptible.steps(latents)  # Ctrl-C and SIGTERM act within a step

    def parameters(item, n):
        position = {} if batch else {"Batch_size": n, "Batch_pos": item.pos}
        return cli.parameters(args, sd, steps, cfg, item.seed, (width, height), prompt=prompts[item.source], **position)

    job = distributed.Job(
        prog=prog,
        items=items,
        batch_size=args.batch_size,
        output=output,
        generate=generate,
        steps=calls,
        decode=lambda x, chunk: cli.decode(sd, x, args.decoding_batch_size),
        parameters=parameters,
        individual=batch or args.save_individual,
        image_size=(width, height),
        grid_rows=args.n_rows if args.grid or not batch else None,
        grid_parameters=cli.parameters(args, sd, steps, cfg, seeds[0], (width, height), prompt=prompts[0]),
        resume=args.resume,
        verbose=args.verbose,
    )
    written = distributed.run(job, group)
    if group.rank == 0:
        cli.report_job(args, job, written, "generating")


def run(prog: str = PROG):
    """The command's entry point: errors are one line on stderr prefixed with ``prog``, exit status 2."""
    cli.run_cli(lambda: main(prog=prog), prog)


if __name__ == "__main__":
    run()
