"""Turn an image into another guided by a prompt (img2img), and watch the denoising happen.

    sd-image2image --strength 0.5 original.png 'A lit fireplace'     # or: python image2image.py ... from a clone
    sd-image2image --steps 200 -sd 20 -gt original.png 'A lit fireplace'   # then: sd-triangle out.png

Interim images are written beside the output as ``<base>_<limit>_<count>.<ext>``: ``limit`` is the
number of UNet calls the run makes (its ``int(steps * strength)`` steps; a 2nd-order sampler such
as Heun makes about two calls a step) and ``count`` the calls done so far, so
``<base>_<limit>_<limit>`` is that run's final image and ``<base>_0_0`` the (resized) input.
"""

import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from .. import StableDiffusion, StableDiffusionXL, cli, distributed, images, img2img_steps, inpaint, interruptible
from ..cli import UsageError

# The installed command; the clone's image2image.py runs the same code under its own name.
PROG = "sd-image2image"
DEFAULT_STRENGTH = 0.8
TRIANGLE_STRENGTHS = [round(0.1 * k, 1) for k in range(1, 11)]


def parse_args(argv=None, prog: str = PROG):
    parser = cli.ArgumentParser(prog=prog, description="Transform an image with a text prompt (img2img) with Stable Diffusion in MLX.")
    parser.add_argument("image", nargs="?", default=None, help="the input image (any format PIL reads; converted to RGB, EXIF orientation applied); with --images leave it out")
    cli.add_common_arguments(parser)
    parser.add_argument("--images", default=None, metavar="FILE", help="a text file of input images, one path a line, or IMAGE<TAB>MASK to inpaint: --n_images (or --seeds) images each, saved as <base>_<k>.<ext>")
    parser.add_argument("--strength", type=float, default=None, help=f"how much to change the image, in (0, 1]: int(steps * strength) steps are run (default {DEFAULT_STRENGTH}; with a mask the inpainting pipeline's: 1, 0.9999 for SDXL)")
    masks = parser.add_argument_group("inpainting (repaint where the mask is white, as A1111's inpaint tab and diffusers' inpainting pipelines)")
    masks.add_argument("--mask", default=None, metavar="MASK", help="a black-and-white picture of the input's size, white = repaint (no transparency); with --images, for the lines without their own mask")
    masks.add_argument("--mask-blur", dest="mask_blur", type=float, default=0, metavar="R", help="blur the mask's edge by a Gaussian of radius R px first (A1111's Mask blur, whose UI default is 4; diffusers' mask_processor.blur; default 0)")
    masks.add_argument("--invert-mask", dest="invert_mask", action="store_true", help="repaint where the mask is black instead (A1111's Mask mode: Inpaint not masked)")
    masks.add_argument("--inpaint-only-masked", dest="only_masked", type=int, nargs="?", const=32, default=None, metavar="PADDING", help="generate only the mask's box grown by PADDING px (default 32) at the full output size, then paste it back (A1111's Inpaint area: Only masked; diffusers' padding_mask_crop)")
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


@dataclass
class Source:
    """One input image of a run: the picture as given, its mask as the run reads it, what the model gets."""

    path: str
    original: Image.Image  # the input picture, RGB
    mask_path: str | None = None  # its mask's file (None: img2img)
    mask: Image.Image | None = None  # the mask at the original's size, inverted and blurred as asked
    picture: Image.Image | None = None  # what the model gets: the input shrunk to the VAE factor, or the only-masked crop
    run_mask: Image.Image | None = None  # the mask of ``picture``
    crop: inpaint.MaskCrop | None = None

    def prepare(self, args, factor: int, quiet: bool):
        """The model's input (and mask) for a VAE factor: the input shrunk, or its only-masked crop at that size."""
        try:
            size = images.size_to_multiple(self.original.size, factor, args.resize)
        except ValueError as e:
            raise UsageError(f"{self.path}: {e}" if args.images else str(e)) from None
        if self.mask is not None and args.only_masked is not None:
            # The mask is blurred already: the crop's box and the paste-back read it as it is.
            self.crop = inpaint.crop_to_mask(self.original, self.mask, args.only_masked, *size, multiple=factor)
            self.picture, self.run_mask = self.crop.image, self.crop.mask
            return
        self.picture = images.resize_to_multiple(self.original, factor, args.resize)
        if self.mask is not None:  # as diffusers' mask processor resizes a mask to the image's size
            self.run_mask = self.mask if self.mask.size == size else self.mask.resize(size, Image.Resampling.LANCZOS)
            try:  # a few white pixels can vanish in the resize: refused here, before any model loads or file is written
                inpaint.load_mask(self.run_mask, size)
            except ValueError as e:
                raise UsageError(f"--mask {self.mask_path!r} resized to {size[0]}x{size[1]}: {e}") from None
        if self.picture.size != self.original.size and not quiet:
            (w, h), name = self.original.size, f" {self.path}" if args.images else ""
            print(f"resizing the input image{name} from {w}x{h} to {size[0]}x{size[1]} (multiples of {factor} px)", file=sys.stderr)

    @property
    def size(self) -> tuple:
        """(width, height) of the pictures this input makes: the original's when pasted back into it."""
        return self.original.size if self.crop is not None else self.picture.size

    def finish(self, pictures: np.ndarray) -> np.ndarray:
        """Decoded (N, H, W, 3) uint8 pictures as saved: pasted back into the original for only-masked."""
        if self.crop is None:
            return pictures
        return np.stack([np.asarray(p) for p in self.crop.paste(pictures.astype(np.float32) / 255)])


def read_sources(args) -> list[Source]:
    """The input images and their masks, read and checked (before any model loads)."""
    if args.images is None:
        lines = [args.image]
    else:
        try:
            lines = distributed.read_list(args.images, "--images")
        except ValueError as e:
            raise UsageError(str(e)) from None
    sources = []
    for n, line in enumerate(lines, start=1):
        path, tab, mask = line.partition("\t")
        path, mask = path.strip(), mask.strip() or None
        if tab and (mask is None or "\t" in mask):
            raise UsageError(f"--images line {n}: {line!r} is not IMAGE or IMAGE<TAB>MASK")
        sources.append(Source(path, cli.read_image(path), mask or args.mask))
    masked = [s.mask_path is not None for s in sources]
    if any(masked) and not all(masked):
        raise UsageError(f"--images line {masked.index(False) + 1} has no mask while others have one: give IMAGE<TAB>MASK on every line, or --mask for the lines without one")
    if not any(masked):
        for flag, given in (("--mask-blur", args.mask_blur), ("--invert-mask", args.invert_mask), ("--inpaint-only-masked", args.only_masked is not None)):
            if given:
                raise UsageError(f"{flag} applies to inpainting: add --mask MASK")
    if not 0 <= args.mask_blur < float("inf"):
        raise UsageError(f"--mask-blur must be a finite number >= 0 (got {args.mask_blur:g})")
    if args.only_masked is not None and args.only_masked < 0:
        raise UsageError(f"--inpaint-only-masked PADDING must be >= 0 (got {args.only_masked})")
    for source in sources:
        if source.mask_path is not None:
            source.mask = read_mask(source.mask_path, source.original.size, args)
    return sources


def read_mask(path: str, size: tuple, args) -> Image.Image:
    """The mask as the run reads it: checked (a picture, no transparency, the input's size, neither all black nor
    all white), inverted for --invert-mask (before blurring, as A1111), blurred by --mask-blur."""
    try:
        # Inverted before any check, so that "all black" and "all white" speak of the mask the run reads.
        mask = ImageOps.invert(inpaint.read_mask_picture(path).convert("L")) if args.invert_mask else path
        return inpaint.load_mask(mask, size, args.mask_blur)
    except ValueError as e:
        message = str(e)
        what = f"--mask {path!r}" + (" once inverted (--invert-mask)" if args.invert_mask else "")
        raise UsageError(message if repr(path) in message else f"{what}: {message}") from None


def inpaint_fields(args, source: Source) -> dict:
    """A1111's inpainting infotext fields (modules/img2img.py, processing.py): Mask blur whenever a mask is
    used, Mask mode when inverted, Inpaint area and Masked area padding for only-masked."""
    if source.mask is None:
        return {}
    only_masked = source.crop is not None
    return {
        "Mask_blur": f"{args.mask_blur:g}",
        "Mask_mode": "Inpaint not masked" if args.invert_mask else None,
        "Inpaint_area": "Only masked" if only_masked else None,
        "Masked_area_padding": args.only_masked if only_masked else None,
    }


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
    if args.strength is not None and not 0 < args.strength <= 1:
        raise UsageError(f"--strength must be in (0, 1] (got {args.strength:g})")
    if args.show_denoising is not None and args.show_denoising < 1:
        raise UsageError(f"-sd/--show_denoising must be at least 1 (got {args.show_denoising})")
    if args.save_last_N < 0:
        raise UsageError(f"--save_last_N must be >= 0 (got {args.save_last_N})")
    interim = bool(args.show_denoising or args.save_last_N or args.generate_triangle)
    if interim and (cli.is_batch(args) or group.distributed or args.resume):
        raise UsageError("-sd, --save_last_N and -gt run one image in one process: not with --images, --seeds, --resume or mlx.launch")
    sources = read_sources(args)
    masked = sources[0].mask is not None
    cli.check_prompt_loras([args.prompt], args)
    # The configs only: size, steps, memory and every file name are checked before any weight is read or downloaded.
    largest = max((s.original for s in sources), key=lambda picture: picture.size[0] * picture.size[1])
    model, _ = cli.check_before_loading(args, picture_size=largest.size, n_sources=len(sources), one_batch=interim)
    if model.inpainting and not masked:
        raise UsageError(f"--model {args.model!r} is an inpainting model (its UNet reads a mask): give --mask MASK")
    inpaint_strength = (StableDiffusionXL if model.is_xl else StableDiffusion).inpaint_strength
    strength = args.strength if args.strength is not None else inpaint_strength if masked else DEFAULT_STRENGTH
    strengths = TRIANGLE_STRENGTHS if args.generate_triangle else [strength]
    if args.steps is not None:
        check_steps(args.steps, strengths, args.generate_triangle)
    inputs = [path for s in sources for path in (s.path, s.mask_path) if path] + [spec.image for spec in args.controls]
    cli.check_written_paths(files_to_write(output, args, model.steps(args), strengths, len(sources), model.calls), inputs=inputs)

    for source in sources:  # from the configs' VAE factor: a mask the resize empties is refused before loading
        source.prepare(args, model.latent_factor, quiet=group.rank != 0)
    sd = cli.load(args)
    steps, cfg = cli.steps_and_cfg(args, sd)
    if masked and args.cfg is None and sd.defaults.cfg_weight > 0:  # a distilled model keeps its 0
        cfg = sd.inpaint_cfg  # the inpainting pipelines' default guidance
    check_steps(steps, strengths, args.generate_triangle)
    if group.rank == 0:
        cli.report_prompt(args, sd, args.prompt, steps, cfg)
    first = sources[0]
    cli.check_controls(sd, cli.controls_for(args, *first.picture.size, first.crop), *first.picture.size)
    seed = None if args.seed_list else group.broadcast_seed(lambda: cli.draw_seed(args.seed))
    seeds = args.seed_list or distributed.seeds_for(seed, args.n_images)
    if not interim:
        return run_job(args, group, sd, output, sources, seeds, steps, cfg, strength, prog)
    run_interim(args, sd, output, sources[0], seed, seeds, steps, cfg, strengths, prog)


def generate(args, sd, source: Source, n: int, strength: float, steps: int, cfg: float, seeds: list):
    """The facade's img2img (inpainting with a mask) of ``source`` for ``seeds``, each image's noise from its own seed."""
    f = sd.latent_factor
    w, h = source.picture.size
    try:
        return sd.generate_latents_from_image(
            images.to_model_input(source.picture),
            args.prompt,
            n_images=n,
            strength=strength,
            num_steps=steps,
            cfg_weight=cfg,
            negative_text=args.negative_prompt,
            noise=distributed.initial_noise(seeds, (h // f, w // f, sd.autoencoder.config.latent_channels)),
            step_noise=distributed.step_noise(seeds, sd.denoising_calls(steps)),
            mask=source.run_mask,
            controls=cli.controls_for(args, w, h, source.crop),
            guess_mode=args.guess_mode,
            **cli.prompt_options(args),
        )
    except ValueError as e:
        raise cli.refused(e) from None


def run_interim(args, sd, output, source: Source, seed, seeds, steps, cfg, strengths, prog):
    """One input, one process: the final grid and the interim grids of -sd/--save_last_N, for each strength of -gt."""
    size = source.size
    fields = inpaint_fields(args, source)
    written = []
    path = images.sibling(output, 0, 0)  # the input as tile <base>_0_0, in the same grid as the outputs
    inputs = np.stack([np.asarray(source.original if source.crop is not None else source.picture)] * args.n_images)
    cli.save_grid(inputs, path, args.n_rows, cli.parameters(args, sd, steps, cfg, seed, size, Denoising_strength=0, **fields))
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
            **fields,
        )
        latents = generate(args, sd, source, args.n_images, strength, steps, cfg, seeds)  # image j: seed + j, as in a run without -sd/-gt
        pictures = None
        for count, x_t in cli.denoise(latents, limit, desc=f"strength {strength:g}"):
            pictures = None
            if count in keep:
                pictures = source.finish(cli.decode(sd, x_t, args.decoding_batch_size))
                path = images.sibling(output, limit, count)
                cli.save_grid(pictures, path, args.n_rows, params(count), args.save_prompt and count == limit)
                written.append(path)
        cli.report_memory(args, f"strength {strength:g}")
        if pictures is None:  # the final step was not saved as an interim file
            pictures = source.finish(cli.decode(sd, x_t, args.decoding_batch_size))
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


def run_job(args, group, sd, output, sources: list[Source], seeds, steps, cfg, strength, prog: str = PROG):
    """Every (input image, seed) pair, one file each (a batch job) or one grid, split over the ranks."""
    batch = cli.is_batch(args)
    items = distributed.make_items(len(sources), seeds)
    sizes = {s.size for s in sources}
    if batch and args.grid and len(sizes) > 1:
        raise UsageError(f"--grid needs input images of one size (after resizing); got {', '.join(f'{w}x{h}' for w, h in sorted(sizes))}")
    if batch and args.grid and len(items) % args.n_rows:
        raise UsageError(f"--n_rows {args.n_rows} does not divide the {len(items)} images of the grid")

    def generate_batch(chunk):
        latents = generate(args, sd, sources[chunk[0].source], len(chunk), strength, steps, cfg, [it.seed for it in chunk])
        return interruptible.steps(latents)  # Ctrl-C and SIGTERM act within a step

    def parameters(item, n):
        position = {} if batch else {"Batch_size": n, "Batch_pos": item.pos}
        source = sources[item.source]
        return cli.parameters(args, sd, steps, cfg, item.seed, source.size, Denoising_strength=f"{strength:g}", **inpaint_fields(args, source), **position)

    job = distributed.Job(
        prog=prog,
        items=items,
        batch_size=args.batch_size,
        output=output,
        generate=generate_batch,
        steps=sd.denoising_calls(steps, strength),
        decode=lambda x, chunk: sources[chunk[0].source].finish(cli.decode(sd, x, args.decoding_batch_size)),
        parameters=parameters,
        individual=batch or args.save_individual,
        image_size=sources[0].size,
        grid_rows=args.n_rows if args.grid or not batch else None,
        grid_parameters=cli.parameters(args, sd, steps, cfg, seeds[0], sources[0].size, Denoising_strength=f"{strength:g}", **inpaint_fields(args, sources[0])),
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
