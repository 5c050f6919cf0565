"""What the command-line scripts share: flags, checks, one-line errors, the denoise/decode/save loop.

A user's mistake is one line on stderr and exit status 2 (``UsageError``, ``ModelLoadError``, or a
ValueError from the picture code), Ctrl-C or SIGTERM exits 130/143 leaving no partial file, and
everything that can be checked without the model (flags, paths, writability) is checked before
any model loads.
"""

import argparse
import os
import re
import secrets
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image
from tqdm import tqdm

from . import canny, checkpoint, distributed, embeddings, images, inpaint, interruptible, memory, model_io, prompts
from .config import AutoencoderConfig, CLIPTextModelConfig, UNetConfig
from .controlnet import CONTROLNET_PRESETS, Control, ControlNetConfig, ControlNetModel, checked_controls, controlnet_name, load_controlnet, prepare_control_image
from .errors import ModelLoadError, one_line
from .memory import available_memory  # noqa: F401  (TriangularArray.py's check)
from .pipeline import DISTILLED_REPOS, DISTILLED_STEPS, MAX_CFG_WEIGHT, PRESETS, denoising_calls, load_model, prompt_lora_file
from .sampler_names import SCHEDULES, TABLE, a1111_label, make_sampler, resolve

DEFAULT_MODEL = "sdxl-turbo"
# Images denoised at once unless --batch_size says otherwise: a big job runs as batches of this many
# (A1111's batch size x batch count), so its memory does not grow with the number of images.
DEFAULT_BATCH_SIZE = 8

SAMPLER_RULES = ("diffusers", "a1111")
CONTROL_MODULES = ("none", "canny")  # --control-preprocess: A1111's preprocessor names


class UsageError(Exception):
    """Bad input from the user: the message is printed as one line and the script exits with status 2."""


# ---------------------------------------------------------------------------------------------
# Parsing and errors


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless its help already says it or there is nothing to show; the
    description and epilog (the sampler table) are printed as written."""

    def _get_help_string(self, action):
        nothing = action.default is None or isinstance(action.default, bool) or action.default in ("", argparse.SUPPRESS)
        if "default" in (action.help or "") or nothing:
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage dump), exit status 2."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_cli(main, prog: str):
    """Run ``main()``; user errors become one stderr line and exit 2, Ctrl-C exits 130, SIGTERM 143."""
    formatwarning = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"{prog}: warning: {message}\n"

    def terminate(signum, frame):
        raise SystemExit(143)  # unwinds like Ctrl-C, so atomic writes remove their temporary file

    previous = signal.signal(signal.SIGTERM, terminate)
    lead = int(os.environ.get("MLX_RANK", "0") or 0) == 0  # under mlx.launch every rank sees the same error: rank 0 says it
    try:
        main()
    except (UsageError, ModelLoadError, images.WriteError) as e:
        if lead:
            print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if lead:
            print(f"\n{prog}: interrupted", file=sys.stderr)
        interruptible.exit_if_busy(130, interrupted=True)
        sys.exit(130)
    except SystemExit as e:  # SIGTERM (143) among them: a step still computing must not hold the exit
        interruptible.exit_if_busy(e.code if isinstance(e.code, int) else 1, interrupted=e.code == 143)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        warnings.formatwarning = formatwarning


def check_output_path(path: str) -> Path:
    """Fail early (before any model loads) when ``path`` cannot be written."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in images.FORMATS:
        known = ", ".join(images.FORMATS)
        raise UsageError(f"output {str(path)!r}: unknown image extension {path.suffix or '(none)'!r}; use one of {known}")
    folder = path.parent
    if len(path.name.encode()) > _name_max(folder):
        raise UsageError(f"output name {path.name!r} is {len(path.name.encode())} bytes; the file system allows {_name_max(folder)}")
    if path.is_dir():
        raise UsageError(f"output {str(path)!r} is a directory; give a file name such as {str(path / 'out.png')!r}")
    if not folder.exists():
        raise UsageError(f"output directory {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise UsageError(f"output directory {str(folder)!r} is not a directory")
    try:  # a real probe: permission bits say nothing about root or read-only file systems
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        raise UsageError(f"output directory {str(folder)!r} is not writable") from None
    return path


def read_image(path: str):
    """The input picture as RGB, or a UsageError naming the file."""
    try:
        return images.load_image(path)
    except ValueError as e:
        raise UsageError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# The flags txt2image.py and image2image.py share


def add_common_arguments(parser):
    presets = ", ".join(PRESETS)
    parser.epilog = sampler_table()
    parser.add_argument("prompt", nargs="?", default=None, help="what the image should show")
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a preset ({presets}), a Hugging Face repo id (owner/name), a local diffusers folder or a single-file .safetensors checkpoint",
    )
    parser.add_argument("--n_images", type=int, default=1, help="how many images to generate (per prompt); image i uses seed --seed + i, as A1111 numbers them")
    parser.add_argument("--n_rows", type=int, default=1, help="rows of the output grid; must divide --n_images")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, 2 for turbo models, else 50)")
    parser.add_argument("--cfg", type=float, default=None, help="classifier-free guidance weight; <= 1 turns guidance off (default: the model's: 0 for turbo, 5 for SDXL, else 7.5)")
    parser.add_argument("--negative_prompt", default="", help="what the image should not show (used when --cfg > 1)")
    parser.add_argument("--sampler", default=None, metavar="NAME", help='an A1111 sampler name ("DPM++ 2M", "Euler a", the legacy "DPM++ 2M Karras"), or ours ("dpm++2m"); case-insensitive; see the table below (default: the model\'s own scheduler)')
    parser.add_argument("--schedule", default=None, metavar="TYPE", help=f"A1111's schedule type for a sigma-based sampler: {', '.join(SCHEDULES)} (default: the sampler's own, or the legacy name's)")
    parser.add_argument("--sampler-rules", dest="sampler_rules", default="diffusers", choices=SAMPLER_RULES, help="whose sigma schedule the samplers follow: diffusers' scheduler classes, or A1111's (k-diffusion's get_sigmas, so that an A1111 infotext reproduces)")
    parser.add_argument("--seed", type=int, default=None, help="random seed in [0, 2**64); -1 or none: drawn and printed; always stored in the PNG")
    parser.add_argument("--config", dest="config_dir", default=None, metavar="DIR", help="for a single-file checkpoint: take the configs and tokenizers from this diffusers folder instead of the shipped ones (diffusers' from_single_file(config=...))")
    parser.add_argument("--prediction-type", dest="prediction_type", default=None, choices=["epsilon", "v_prediction"], help="for a single-file SD 2.x checkpoint, what its UNet predicts (its keys cannot tell; default: v_prediction, as diffusers)")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="merge a LoRA file (kohya/A1111 or diffusers/PEFT .safetensors) at SCALE (default 1); repeatable")
    text = parser.add_argument_group("prompt syntax (AUTOMATIC1111's: (word:1.3), [word], BREAK, [from:to:when], [a|b], <lora:NAME:W>, embeddings by name)")
    text.add_argument("--prompt-syntax", dest="prompt_syntax", default="a1111", choices=prompts.SYNTAXES, help="a1111: read the prompts as AUTOMATIC1111 does, longer than 75 tokens in chunks; none: literally, as diffusers (cut at 75 tokens)")
    text.add_argument("--emphasis", default="Original", choices=prompts.EMPHASES, help="how (word:1.3) weights apply, as A1111's option: Original (rescaled to the chunk's mean), 'No norm', None (brackets are plain text)")
    text.add_argument("--clip-skip", dest="clip_skip", type=int, default=1, metavar="N", help="A1111's Clip skip: the text encoder's N-th layer from the end (SD 1.x; A1111 ignores it for SD 2.x and SDXL)")
    text.add_argument("--pad-conds", dest="pad_conds", action="store_true", help="a prompt and negative of different chunk counts: pad the shorter with empty chunks, one UNet call per step (A1111's 'Pad prompt/negative prompt'); default: two calls, as A1111")
    text.add_argument("--embedding", dest="embeddings", action="append", default=[], metavar="PATH", help="a textual-inversion embedding (.safetensors) that prompts call by its file name, e.g. EasyNegative; repeatable")
    text.add_argument("--lora-dir", dest="lora_dir", default=None, metavar="DIR", help="the folder where a prompt's <lora:NAME:W> finds NAME.safetensors")
    parser.add_argument("--no-float16", dest="float16", action="store_false", help="run everything in float32 (by default the text encoders, UNet and VAE run in float16; SDXL's VAE stays float32 when its config sets force_upcast, as diffusers does)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize the text encoders to 4 bits and the UNet's linear layers to 8 bits")
    parser.add_argument("--preload-models", action="store_true", help="read all weights before generating instead of at first use")
    parser.add_argument("--decoding_batch_size", type=int, default=1, help="how many latents the VAE decodes at once")
    parser.add_argument("-o", "--output", default="out.png", help="output file (.png, .jpg, .jpeg or .webp; only PNG stores the parameters)")
    parser.add_argument("--save_individual", action="store_true", help="also save each image as <base>_<i>.<ext> beside the grid")
    parser.add_argument("-sp", "--save_prompt", action="store_true", help="print the parameters stored in the PNG, read back from the file")
    parser.add_argument("-pp", "--print_parser", action="store_true", help="print the parsed arguments at start")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the device MLX runs on, timings and peak memory (mx.get_peak_memory)")
    batch = parser.add_argument_group("many images (also split over the ranks of mlx.launch -n K)")
    batch.add_argument("--seeds", default=None, metavar="LIST", help="one image per seed (per prompt or input image): a list 1,2,3, a range 10-19 or both (1,5-7); instead of --seed/--n_images")
    batch.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="images denoised at once on a rank (A1111's batch size: more images run as several batches, each image as in one batch); the batches are the same for any number of ranks")
    batch.add_argument("--resume", action="store_true", help="skip the images whose file <base>_<k>.<ext> is finished: it decodes and holds this job's parameters (others are made again)")
    batch.add_argument("--grid", action="store_true", help="with --seeds or a list of prompts/images: also write the grid <base>.<ext>")
    add_control_arguments(parser)


def add_control_arguments(parser):
    """The ControlNet flags of both scripts (A1111's ControlNet units: model, image, weight, guidance start/end, preprocessor)."""
    group = parser.add_argument_group(
        "ControlNet (guide the image by edges, depth, pose...; each flag below once for all --control, or once per --control in order)"
    )
    group.add_argument("--control", nargs=2, action="append", default=[], metavar=("MODEL", "IMAGE"), help=f"a ControlNet (a preset: {', '.join(CONTROLNET_PRESETS)}; a Hub repo id, a diffusers folder or a .safetensors file) and its control picture; repeatable: the ControlNets are summed (default: none)")
    group.add_argument("--control-scale", dest="control_scale", type=float, action="append", default=[], metavar="S", help="the ControlNet's weight (A1111's Weight; default 1)")
    group.add_argument("--control-start", dest="control_start", type=float, action="append", default=[], metavar="A", help="the fraction of the steps where the ControlNet starts acting (A1111's Guidance Start; default 0)")
    group.add_argument("--control-end", dest="control_end", type=float, action="append", default=[], metavar="B", help="the fraction of the steps where it stops (A1111's Guidance End; default 1)")
    group.add_argument("--control-preprocess", dest="control_preprocess", action="append", default=[], choices=CONTROL_MODULES, help="what the control picture goes through first: none (it is the control image: an edge map, a depth map...) or canny (edges of a photo; default none)")
    group.add_argument("--canny-low", dest="canny_low", type=float, default=None, metavar="T", help="Canny's low threshold (A1111's Threshold A; default 100)")
    group.add_argument("--canny-high", dest="canny_high", type=float, default=None, metavar="T", help="Canny's high threshold (A1111's Threshold B; default 200)")
    group.add_argument("--guess-mode", dest="guess_mode", action="store_true", help="the ControlNets see only the prompt's half of guidance, their skips weighted 0.1 to 1 (diffusers' guess_mode)")


def sampler_table() -> str:
    """The samplers for --help's epilog: A1111 name, our id, diffusers class, k-diffusion function."""
    header = ("A1111 name", "ours", "diffusers class", "k-diffusion function")
    rows = [header, *[(row.a1111, row.id, row.diffusers, row.k_diffusion) for row in TABLE]]
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    lines = ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "samplers (--sampler; A1111's legacy names such as \"DPM++ 2M Karras\" too):\n" + "\n".join(lines)


def check_sampler_arguments(args):
    """--sampler and --schedule name a sampler we have, before any model loads."""
    for flag, schedule in (("--sampler", None), ("--schedule", args.schedule)):
        try:
            resolve(args.sampler, schedule)
        except ValueError as e:
            raise UsageError(f"{flag}: {one_line(e)}") from None


def check_common_arguments(args) -> Path:
    """Every check that needs no model; returns the output path."""
    if args.print_parser:
        print(args)
    check_sampler_arguments(args)
    if args.n_images < 1:
        raise UsageError(f"--n_images must be at least 1 (got {args.n_images})")
    if args.n_rows < 1 or (args.n_images % args.n_rows and not is_batch(args)):  # a batch job checks its total later
        raise UsageError(f"--n_rows {args.n_rows} does not divide --n_images {args.n_images}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be at least 1 (got {args.steps})")
    if args.cfg is not None and not 0 <= args.cfg < float("inf"):
        raise UsageError(f"--cfg must be a finite number >= 0 (got {args.cfg})")
    if args.cfg is not None and args.cfg > MAX_CFG_WEIGHT:
        raise UsageError(f"--cfg {args.cfg:g} is above {MAX_CFG_WEIGHT:g}: guidance that strong overflows to a black image")
    if args.decoding_batch_size < 1:
        raise UsageError(f"--decoding_batch_size must be at least 1 (got {args.decoding_batch_size})")
    if args.seed is not None and args.seed != -1 and not 0 <= args.seed < 2**64:
        raise UsageError(f"--seed must be in [0, 2**64) or -1 to draw one (got {args.seed})")
    check_batch_arguments(args)
    args.lora = [parse_lora(spec) for spec in args.lora]
    check_text_arguments(args)
    check_model_name(args.model)
    check_control_arguments(args)
    if args.config_dir is not None and not (Path(args.config_dir).expanduser() / "model_index.json").is_file():
        raise UsageError(f"--config {args.config_dir!r}: not a diffusers model folder (no model_index.json)")
    return check_output_path(args.output)


def check_text_arguments(args):
    """--clip-skip, --lora-dir and the --embedding files (read now: a bad file fails before the model loads)."""
    if args.clip_skip < 1:
        raise UsageError(f"--clip-skip must be at least 1 (got {args.clip_skip})")
    if args.lora_dir is not None and not Path(args.lora_dir).expanduser().is_dir():
        raise UsageError(f"--lora-dir {args.lora_dir!r}: no such folder")
    for path in args.embeddings:
        if not Path(path).expanduser().is_file():
            raise UsageError(f"--embedding {path!r}: no such file")
        try:
            embeddings.load_embedding(path)
        except ValueError as e:
            raise UsageError(f"--embedding {path!r}: {one_line(e)}") from None


def check_prompt_loras(texts, args):
    """Every <lora:NAME:W> of the prompts names a file in --lora-dir (checked before the model loads)."""
    if args.prompt_syntax == "none":
        return
    for text in texts:
        for name, weight in prompts.extract_loras(text)[1]:
            try:
                prompt_lora_file(name, weight, args.lora_dir)
            except ValueError as e:
                raise UsageError(str(e).replace("lora_dir= (--lora-dir)", "--lora-dir")) from None


def prompt_options(args) -> dict:
    """The generate_latents arguments that say how the prompts are read."""
    return dict(prompt_syntax=args.prompt_syntax, emphasis=args.emphasis, clip_skip=args.clip_skip, pad_conds=args.pad_conds, lora_dir=args.lora_dir)


def report_prompt(args, sd, prompt: str, steps: int, cfg: float):
    """-v: the token and chunk counts of the prompt and, with guidance, of the negative prompt."""
    if not args.verbose:
        return
    info, negative = sd.prompt_info(prompt, args.negative_prompt, steps, args.prompt_syntax, args.emphasis, args.clip_skip)
    parts = [f"prompt: {info.tokens} tokens in {info.chunks} chunk(s) of 75"]
    if cfg > 1:
        parts.append(f"negative prompt: {negative.tokens} tokens in {negative.chunks} chunk(s)")
    if info.embeddings or negative.embeddings:
        parts.append(f"embeddings: {', '.join(dict.fromkeys(info.embeddings + negative.embeddings))}")
    print("; ".join(parts), file=sys.stderr)


def check_batch_arguments(args):
    """--seeds, --batch_size, --resume, --grid; the seeds list is parsed into ``args.seed_list``."""
    args.seed_list = None
    if args.seeds is not None:
        if args.seed is not None:
            raise UsageError("give --seed or --seeds, not both")
        if args.n_images != 1:
            raise UsageError("--seeds makes one image per seed; leave --n_images at 1")
        try:
            args.seed_list = distributed.parse_seeds(args.seeds)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1 (got {args.batch_size})")
    if args.resume and not (is_batch(args) or args.save_individual):
        raise UsageError("--resume skips the files <base>_<k>; they are written with --seeds, a list of prompts/images or --save_individual")


def is_batch(args) -> bool:
    """A job of one file per image (--seeds or a list of prompts/images) rather than one grid."""
    return args.seeds is not None or getattr(args, "prompts", None) is not None or getattr(args, "images", None) is not None


def parse_lora(spec: str) -> tuple[str, float]:
    """``PATH[:SCALE]`` -> (path, scale); the last ':' starts a scale only when a number follows."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            if Path(head).expanduser().is_file() and not Path(spec).expanduser().is_file():
                raise UsageError(f"--lora {spec!r}: the scale {tail!r} is not a number (PATH:SCALE, e.g. {head}:0.8)") from None
    if not np.isfinite(scale):
        raise UsageError(f"--lora {spec!r}: the scale must be a finite number")
    if not Path(path).expanduser().is_file():
        raise UsageError(f"--lora {spec!r}: no such file {path!r}")
    return str(Path(path).expanduser()), scale


# A Hugging Face repo id, as huggingface_hub validates one: owner/name of letters, digits, '-', '_', '.'.
REPO_ID = re.compile(r"[A-Za-z0-9_.-]{1,96}/[A-Za-z0-9_.-]{1,96}")


def check_model_name(model: str):
    path = Path(model).expanduser()
    if model in PRESETS or path.is_dir() or (path.is_file() and path.suffix.lower() == ".safetensors"):
        return
    if path.is_file():
        raise UsageError(f"--model {model!r}: only .safetensors checkpoints (or diffusers folders) are loaded; pickled .ckpt/.bin/.pt files are never opened")
    if model.startswith((".", "/", "~")) or "\\" in model:
        raise UsageError(f"--model {model!r}: no such folder or file")
    if model.count("/") != 1:
        raise UsageError(
            f"unknown model {model!r}: use a preset ({', '.join(PRESETS)}), a Hugging Face repo id (owner/name), "
            "a local diffusers folder or a .safetensors file"
        )
    if not REPO_ID.fullmatch(model) or "--" in model or ".." in model:
        raise UsageError(f"--model {model!r}: no such folder or file, and not a Hugging Face repo id (owner/name of letters, digits, '-', '_' and '.')")


# ---------------------------------------------------------------------------------------------
# ControlNet: the --control flags checked, the ControlNets loaded, their control images and infotext


@dataclass(frozen=True)
class ControlSpec:
    """One --control as checked: the ControlNet's name, its control picture (RGB) and how it acts."""

    model: str
    image: str
    picture: object  # the control picture, read and made RGB (images.load_image)
    scale: float
    start: float
    end: float
    module: str  # a CONTROL_MODULES preprocessor


def check_control_arguments(args):
    """--control and its per-control flags, the control pictures read: ``args.controls`` becomes a list of ControlSpec."""
    n = len(args.control)
    per_control = {"--control-scale": args.control_scale, "--control-start": args.control_start, "--control-end": args.control_end, "--control-preprocess": args.control_preprocess}
    args.controls = []
    if "canny" not in args.control_preprocess and (args.canny_low is not None or args.canny_high is not None):
        raise UsageError("--canny-low/--canny-high apply to the Canny preprocessor: add --control-preprocess canny")
    args.canny_low = 100.0 if args.canny_low is None else args.canny_low
    args.canny_high = 200.0 if args.canny_high is None else args.canny_high
    if not n:
        given = [flag for flag, values in per_control.items() if values] + (["--guess-mode"] if args.guess_mode else [])
        if given:
            raise UsageError(f"{given[0]} applies to ControlNets: add --control MODEL IMAGE")
        return
    for flag, values in per_control.items():
        if len(values) not in (0, 1, n):
            raise UsageError(f"{flag} is given {len(values)} times for {n} --control; give it once (for every ControlNet) or once per --control, in order")
    if "canny" in args.control_preprocess:
        for flag, value in (("--canny-low", args.canny_low), ("--canny-high", args.canny_high)):
            if not 0 <= value < float("inf"):
                raise UsageError(f"{flag} must be a finite number >= 0 (got {value:g})")
        if args.canny_low > args.canny_high:
            raise UsageError(f"--canny-low {args.canny_low:g} is above --canny-high {args.canny_high:g}")

    def nth(values, i, default):
        return default if not values else values[0] if len(values) == 1 else values[i]

    for i, (model, image) in enumerate(args.control):
        check_controlnet_name(model)
        scale, start, end = nth(args.control_scale, i, 1.0), nth(args.control_start, i, 0.0), nth(args.control_end, i, 1.0)
        if not np.isfinite(scale):
            raise UsageError(f"--control-scale must be a finite number (got {scale:g})")
        if not 0 <= start < end <= 1:
            raise UsageError(f"--control {model} {image}: --control-start {start:g} and --control-end {end:g} must satisfy 0 <= start < end <= 1 (fractions of the steps)")
        args.controls.append(ControlSpec(model, image, read_image(image), scale, start, end, nth(args.control_preprocess, i, "none")))


def check_controlnet_name(model: str):
    """A --control MODEL is a preset, a folder, a .safetensors file or a Hub repo id (checked before anything loads)."""
    path = Path(model).expanduser()
    if model in CONTROLNET_PRESETS or path.is_dir() or (path.is_file() and path.suffix.lower() == ".safetensors"):
        return
    if path.is_file():
        raise UsageError(f"--control {model!r}: only .safetensors ControlNet files (or diffusers folders) are loaded; pickled .pth/.ckpt/.bin files are never opened")
    if model.startswith((".", "/", "~")) or "\\" in model or not REPO_ID.fullmatch(model) or "--" in model or ".." in model:
        raise UsageError(f"--control {model!r}: no such folder or file, not a preset ({', '.join(CONTROLNET_PRESETS)}) and not a Hugging Face repo id (owner/name)")


def controlnet_values(name: str, model: "ModelConfigs", float16: bool) -> int:
    """How many values a ControlNet's weights hold, read before it loads.

    A single file: its safetensors header's shapes. A folder or a Hub repo in the HF cache: the
    ControlNet its config.json builds (its arrays are never allocated). A repo not downloaded yet:
    the ControlNet ``ControlNetModel.from_unet`` builds from this model's UNet config, the full-size
    one (the "-mid"/"-small" SDXL ControlNets hold less).
    """
    name = CONTROLNET_PRESETS.get(name, name)
    path = Path(name).expanduser()
    if path.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(path), "numpy") as f:
                return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
        except Exception as e:  # the safetensors library's error for a malformed header
            raise ModelLoadError(f"--control {str(path)!r}: not a readable .safetensors file ({one_line(e)})") from None
    config = None
    if path.is_dir():
        config = model_io.read_config(path if (path / "config.json").exists() else path / "controlnet", "")
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        config = model_io.read_config(Path(cached).parent, "") if isinstance(cached, str) else model.source.config("unet")
    try:
        return memory.parameter_count(ControlNetModel(ControlNetConfig.from_dict(config)))
    except ValueError as e:
        raise UsageError(f"--control {name!r}: {one_line(e)}") from None


def load_controlnets(args) -> list:
    """The --control ControlNets, in order (a model named twice is loaded once); also kept as ``args.controlnets`` for the infotext."""
    loaded = {}
    for spec in args.controls:
        if spec.model not in loaded:
            try:
                loaded[spec.model] = load_controlnet(spec.model, float16=args.float16)
            except ValueError as e:  # a config value that is not implemented
                raise UsageError(f"--control {spec.model!r}: {one_line(e)}") from None
    args.controlnets = [loaded[spec.model] for spec in args.controls]
    if args.verbose:
        for i, (spec, controlnet) in enumerate(zip(args.controls, args.controlnets)):
            values = memory.parameter_count(controlnet)
            print(f"ControlNet {i}: {controlnet_name(controlnet)} ({spec.model}), {values / 1e6:.0f}M parameters, preprocessor {spec.module}", file=sys.stderr)
    return args.controlnets


def controls_for(args, width: int, height: int, crop=None) -> list:
    """The Controls of a generation of width x height, their images prepared at that size as the
    pipeline prepares a control picture (numpy: the steps may run in another thread than this one).

    ``crop``: only-masked inpainting's inpaint.MaskCrop: each control picture, at the original's
    size, is cut and filled to the generation as the input is (A1111's ControlNet crops its
    control images with the inpainting's crop region likewise).
    """
    controls = []
    for spec, controlnet in zip(args.controls, args.controlnets):
        picture = spec.picture
        if crop is not None:
            if picture.size != crop.original.size:
                picture = picture.resize(crop.original.size, Image.Resampling.LANCZOS)
            picture = inpaint.crop_and_fill(picture, crop.box, width, height)
        image = np.asarray(prepare_control_image(picture, height, width))[0]  # (H, W, 3) in [0, 1]
        if spec.module == "canny":
            image = canny_edges(image, args.canny_low, args.canny_high)
        controls.append(Control(controlnet, image, spec.scale, spec.start, spec.end))
    return controls


def check_controls(sd, controls: list, width: int, height: int):
    """The facade's checks of a generation's Controls (a ControlNet of another model family...), once the
    models are loaded and before the job starts: a refusal is one line, not a line after the progress bars."""
    try:
        checked_controls(controls, sd.unet.config, sd.latent_factor, 1, height, width)
    except ValueError as e:
        raise refused(e) from None


def canny_edges(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """A1111's canny preprocessor on a prepared control image ((H, W, 3) in [0, 1], 8-bit values):
    ``cv2.Canny``'s edges (canny.canny) stacked to three channels, (H, W, 3) float32 in {0, 1}."""
    edges = canny.canny(np.rint(image * 255).astype(np.uint8), low, high)
    return np.repeat(edges[..., None], 3, axis=-1).astype(np.float32) / 255


def control_fields(args) -> dict:
    """The infotext of the ControlNets, as A1111's ControlNet extension writes each unit: ``ControlNet 0: "Module: ..., Model: ..., ..."``."""
    fields = {}
    for i, (spec, controlnet) in enumerate(zip(getattr(args, "controls", ()), getattr(args, "controlnets", ()))):
        thresholds = f", Threshold A: {args.canny_low:g}, Threshold B: {args.canny_high:g}" if spec.module == "canny" else ""
        fields[f"ControlNet_{i}"] = (
            f"Module: {spec.module}, Model: {controlnet_name(controlnet)}, Weight: {spec.scale}, "
            f"Guidance Start: {spec.start}, Guidance End: {spec.end}{thresholds}"
        )
    if fields and args.guess_mode:
        fields["Guess_mode"] = True
    return fields


def draw_seed(seed):
    if seed is None or seed == -1:
        seed = secrets.randbelow(2**31)
        print(f"seed: {seed} (pass --seed {seed} to make this image again)")
    return seed


def device_name() -> str:
    """The device MLX computes on, with its backend: 'gpu (CUDA)', 'gpu (Metal)' or 'cpu'."""
    if mx.default_device() != mx.gpu:
        return "cpu"
    cuda = hasattr(mx, "cuda") and mx.cuda.is_available()
    return "gpu (CUDA)" if cuda else "gpu (Metal)" if mx.metal.is_available() else "gpu"


def source_options(args) -> dict:
    """What a single-file checkpoint takes beside its path (--prediction-type, --config)."""
    options = {"prediction_type": args.prediction_type, "config_dir": args.config_dir}
    return {k: v for k, v in options.items() if v is not None}


def load(args):
    """The facade for --model, with its LoRAs, quantized and preloaded as asked."""
    start = time.perf_counter()
    if args.verbose:
        print(f"MLX device: {device_name()}", file=sys.stderr)
    try:
        options = source_options(args)
        sd = load_model(args.model, float16=args.float16, sampler=args.sampler, schedule=args.schedule, sampler_rules=args.sampler_rules, **options)
    except ValueError as e:  # an unsupported config value or sampler name
        raise UsageError(f"--model {args.model!r}: {e}") from None
    for path, scale in args.lora:
        try:
            sd.load_lora(path, scale)
        except ValueError as e:
            raise UsageError(f"--lora {path!r}: {e}") from None
    for path in args.embeddings:
        try:
            sd.load_embedding(path)
        except ValueError as e:
            raise UsageError(f"--embedding {path!r}: {one_line(e)}") from None
    load_controlnets(args)
    if args.quantize:
        sd.quantize(text_bits=4, unet_bits=8)
    if args.preload_models:
        sd.ensure_models_are_loaded()
    if args.verbose:
        print(f"model loaded in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return sd


def steps_and_cfg(args, sd):
    steps = sd.defaults.num_steps if args.steps is None else args.steps
    cfg = sd.defaults.cfg_weight if args.cfg is None else args.cfg
    most = sd.sampler.config.num_train_timesteps
    if steps > most:
        raise UsageError(f"--steps {steps} is more than the model's {most} training timesteps")
    if args.negative_prompt and cfg <= 1:
        warnings.warn(f"--negative_prompt is not used at --cfg {cfg:g} (guidance, which reads it, runs only above 1)")
    return steps, cfg


def parameters(args, sd, steps, cfg, seed, size, *, prompt=None, **extra) -> str:
    """The A1111 parameters text for this run; ``size`` is (width, height) of one image."""
    from . import lora

    prompt = args.prompt if prompt is None else prompt
    negative = args.negative_prompt if cfg > 1 else ""  # without guidance the negative prompt takes no part in the image
    info, negative_info = sd.prompt_info(prompt, negative, steps, args.prompt_syntax, args.emphasis, args.clip_skip)
    lora_files = [prompt_lora_file(name, weight, args.lora_dir) for name, weight in info.loras] + [p for p, _ in args.lora]
    used = dict.fromkeys(info.embeddings + negative_info.embeddings)
    # A1111's TI hashes: each name without ':' and ','; the hash is the embedding's.
    ti_hashes = ", ".join(f"{e.name.replace(':', '').replace(',', '')}: {e.hash}" for e in sd.embeddings if e.name in used)
    emphasized = any(c in text for text in (prompt, negative) for c in "([")  # A1111 writes a non-default emphasis only then
    prompt += "".join(f" <lora:{lora.a1111_name(p)}:{s:g}>" for p, s in args.lora)
    sampler, schedule = a1111_label(sd.sampler)
    return images.format_parameters(
        prompt,
        negative,
        Steps=steps,
        Sampler=sampler,
        Schedule_type=schedule,
        CFG_scale=f"{cfg:g}",
        Seed=seed,
        Size=f"{size[0]}x{size[1]}",
        Model_hash=checkpoint.model_hash(sd.source.path) if isinstance(sd.source, checkpoint.SingleFileSource) else None,
        Model=Path(args.model).stem if isinstance(sd.source, checkpoint.SingleFileSource) else args.model,
        Clip_skip=args.clip_skip if args.clip_skip > 1 else None,
        Lora_hashes=lora.infotext_hashes(lora_files) if lora_files else None,
        TI_hashes=ti_hashes or None,
        Emphasis=args.emphasis if args.emphasis != "Original" and emphasized else None,
        Pad_conds=True if args.pad_conds else None,
        **control_fields(args),
        **extra,
    )


# ---------------------------------------------------------------------------------------------
# Checks against the model's small config files, before any weight is read or downloaded


@dataclass(frozen=True)
class ModelConfigs:
    """What the flags are checked against, read from the configs alone (a Hub repo's weights are not fetched yet)."""

    unet: UNetConfig
    vae: AutoencoderConfig
    num_train_timesteps: int
    latent_size: tuple  # the native (h, w) in latents: unet.sample_size
    distilled: bool  # sdxl-turbo / sd-turbo: 2 steps, no guidance by default (as the facade decides)
    is_xl: bool
    source: object  # the opened model source (model_io.open_model), for the configs read later
    sampler: object  # the sampler --sampler/--schedule name on this model's scheduler config

    @property
    def latent_factor(self) -> int:
        return self.vae.downsample_factor

    @property
    def inpainting(self) -> bool:
        """A UNet that reads a mask and the masked image beside the latents (9 input channels)."""
        return inpaint.is_inpainting_unet(self.unet)

    def steps(self, args) -> int:
        return (DISTILLED_STEPS if self.distilled else 50) if args.steps is None else args.steps

    def cfg(self, args) -> float:
        return (0.0 if self.distilled else 5.0 if self.is_xl else 7.5) if args.cfg is None else args.cfg

    def calls(self, steps: int, strength=None) -> int:
        """UNet calls (latents yielded) of a run: more than ``steps`` for a 2nd-order sampler."""
        return denoising_calls(self.sampler, steps, strength)


def read_model_configs(args) -> ModelConfigs:
    """Open --model's source and read its scheduler, UNet and VAE configs; a malformed one is a ModelLoadError."""
    name = PRESETS.get(args.model, args.model)
    options = source_options(args)
    source = model_io.open_model(name, args.float16, **options)
    unet = model_io.read_component_config(source, "unet", UNetConfig)
    vae = model_io.read_component_config(source, "vae", AutoencoderConfig)
    try:
        sampler = make_sampler(args.sampler, source.config("scheduler"), args.schedule, args.sampler_rules)
    except ValueError as e:
        raise ModelLoadError(f"{model_io.config_file(source, 'scheduler')}: {e}") from None
    sample_size = source.config("unet").get("sample_size", 64)
    latent_size = tuple(sample_size) if isinstance(sample_size, (list, tuple)) else (sample_size, sample_size)
    is_xl = "XL" in source.model_index().get("_class_name", "") or source.has("text_encoder_2")
    distilled = model_io.repo_id_of(name) in DISTILLED_REPOS
    return ModelConfigs(unet, vae, sampler.config.num_train_timesteps, latent_size, distilled, is_xl, source, sampler)


def check_steps_against_model(args, model: ModelConfigs) -> int:
    steps = model.steps(args)
    if steps > model.num_train_timesteps:
        raise UsageError(f"--steps {steps} is more than the model's {model.num_train_timesteps} training timesteps")
    return steps


def check_before_loading(args, width=None, height=None, picture_size=None, n_sources=1, one_batch=False):
    """What the configs decide, before any weight is read or downloaded: --steps, the image size and the memory.

    txt2img passes --width/--height (None: the model's native size), img2img the input picture's
    size, shrunk to the VAE factor as it will be. ``n_sources`` prompts or input images make
    --n_images (or one per --seeds) images each, in batches of --batch_size; with ``one_batch``
    (img2img's -sd/-gt) all --n_images run at once. Returns the ModelConfigs and (width, height).
    """
    model = read_model_configs(args)
    check_steps_against_model(args, model)
    f = model.latent_factor
    if picture_size is not None:
        try:
            width, height = images.size_to_multiple(picture_size, f, getattr(args, "resize", True))
        except ValueError as e:
            raise UsageError(str(e)) from None
    else:
        width = model.latent_size[1] * f if width is None else width
        height = model.latent_size[0] * f if height is None else height
        for flag, value in (("width", width), ("height", height)):
            if value % f:
                raise UsageError(f"--{flag} {value} is not a multiple of {f} (this model's VAE factor)")
    per_source = len(args.seed_list) if args.seed_list else args.n_images
    try:
        distributed.check_job_size(n_sources, per_source)
    except ValueError as e:
        raise UsageError(str(e)) from None
    batch = per_source if one_batch else min(args.batch_size, per_source)
    kept = n_sources * per_source if args.grid or not is_batch(args) else 0
    check_memory(args, model, width, height, batch, kept, encode=picture_size is not None)
    return model, (width, height)


def memory_model(model: ModelConfigs, float16: bool) -> memory.Model:
    """The configs the memory estimate reads; the text encoders' are read here, after the cheaper checks."""
    encoders = tuple(model_io.read_component_config(model.source, name, CLIPTextModelConfig) for name in ("text_encoder", "text_encoder_2") if model.source.has(name))
    vae_float32 = not float16 or (model.is_xl and model.vae.force_upcast)
    return memory.Model(model.unet, model.vae, encoders, itemsize=2 if float16 else 4, vae_itemsize=4 if vae_float32 else 2)


def check_memory(args, model: ModelConfigs, width: int, height: int, batch: int, kept: int, encode: bool = False):
    """Refuse a run whose estimated memory (memory.estimate) is more than this process may use.

    ``batch`` is the number of images denoised at once, ``kept`` the pictures held for a grid.
    """
    parts = memory.estimate(memory_model(model, args.float16), width, height, batch, model.cfg(args) > 1, args.decoding_batch_size, encode, kept)
    controlnets = dict.fromkeys(spec.model for spec in getattr(args, "controls", ()))
    parts["weights"] += sum(controlnet_values(name, model, args.float16) for name in controlnets) * (2 if args.float16 else 4)
    try:
        memory.check(parts, f"{batch} image(s) at once of {width}x{height}", "use a smaller size, a smaller --batch_size or --decoding_batch_size, or fewer images in one grid")
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_written_paths(paths, inputs=()):
    """Before generating: no directory and no too-long name in the way of a file to write, and no input overwritten."""
    protected = [Path(p).expanduser() for p in inputs]
    for path in paths:
        path = Path(path)
        limit = _name_max(path.parent)
        if len(path.name.encode()) > limit:
            raise UsageError(f"output name {path.name!r} is {len(path.name.encode())} bytes; the file system allows {limit}; choose a shorter -o")
        if path.is_dir():
            raise UsageError(f"{str(path)!r} is a directory, in the way of an output file; move it or choose another -o")
        for source in protected:
            if path.resolve() == source.resolve() or (path.exists() and source.exists() and os.path.samefile(path, source)):
                raise UsageError(f"{str(path)!r} would overwrite the input {str(source)!r}; choose another -o")


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) the folder's file system takes; 255 where it cannot say."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        return 255


# ---------------------------------------------------------------------------------------------
# Running: denoise, decode, save


def denoise(latents, total: int, desc: str = "denoising"):
    """Evaluate each step's latent under a tqdm bar, yielding (step count, latent)."""
    for count, x_t in enumerate(tqdm(interruptible.steps(latents), total=total, desc=desc, leave=False), start=1):
        mx.eval(x_t)
        yield count, x_t


def refused(error: ValueError) -> UsageError:
    """The facade's refusal of a generation's arguments (a ControlNet of another family...) as the user's error."""
    return UsageError(one_line(error))


def decode(sd, x, batch_size: int) -> np.ndarray:
    """Latents -> (N, H, W, 3) uint8 through the facade's chunked decode; NaN images are reported."""
    decoded = interruptible.call(lambda: sd.decode(x, batch_size=batch_size))
    mx.eval(decoded)
    for i in np.flatnonzero(np.isnan(np.asarray(decoded)).any(axis=(1, 2, 3))):
        print(f"warning: the decoded image {i} contains NaN (drawn black); try --no-float16", file=sys.stderr)
    return images.to_uint8(decoded)


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


def report_job(args, job, written: list, what: str):
    """Rank 0's closing lines of a run: peak memory (-v), the stored parameters (-sp), what was written."""
    report_memory(args, what)
    if args.save_prompt:
        print_stored_parameters(written[-1] if job.grid_rows else written[0])
    if is_batch(args):
        grid = f" and the grid {job.output}" if job.grid_rows else ""
        n = len(job.items)
        print(f"saved {n} images {images.sibling(job.output, '<k>')} (k = 1 to {n}){grid}")
    else:
        print(f"saved {job.output}")
