"""Compose the images of an ``image2image.py -gt`` run into a triangular array.

    python image2image.py --steps 200 -sd 20 -gt original.png 'A lit fireplace' -o fire.png
    sd-triangle fire.png                          # -> fire_triangle.png (or: python TriangularArray.py fire.png)

Every ``<base>_<limit>_<count>.<ext>`` beside the base is found: one row per run (``limit`` steps,
i.e. one strength), the input (``<base>_0_0``) at the left, the interim images in step order, and
the run's final image (``<base>_<limit>_<limit>``) in the rightmost column.
"""

import math
import re
import warnings
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .. import cli, images
from ..cli import UsageError

# No image2image.py run is longer (--steps is at most the model's training timesteps, 1000 for
# every real model); a longer one in a file name is not ours and would only make work.
MAX_STEPS = 10000
# The largest picture each format can store, per side.
MAX_SIDE = {"PNG": 2**31 - 1, "JPEG": 65535, "WEBP": 16383}
# The installed command; the clone's TriangularArray.py runs the same code under its own name.
PROG = "sd-triangle"


def parse_args(argv=None, prog: str = PROG):
    parser = cli.ArgumentParser(prog=prog, description="Compose the interim images of an image2image.py -gt (or -sd) run into one triangular picture.")
    parser.add_argument("base", help="the -o/--output given to image2image.py, e.g. out.png: <base>_<limit>_<count>.<ext> files are read beside it")
    parser.add_argument("-o", "--output", default=None, help="the composed picture (default: <base>_triangle.<ext>)")
    parser.add_argument("--seed_image", default=None, help="the picture for the left column (default: <base>_0_0.<ext>, the input image2image.py saved)")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("-ro", "--right_only", action="store_true", help="only the denoising images, each row right-aligned so the finals form the right edge (no input column)")
    layout.add_argument("-ft", "--full_triangle", action="store_true", help="a full pyramid: the input in the centre column, each row's images mirrored to both sides")
    parser.add_argument("--labels", action="store_true", help="write the step (count/limit) and strength on each tile")
    parser.add_argument("--scale", type=float, default=1.0, help="scale every tile by this factor (e.g. 0.25 for a smaller file)")
    parser.add_argument("-pp", "--print_parser", action="store_true", help="print the parsed arguments at start")
    return parser.parse_args(argv)


def discover(base: Path) -> dict[int, dict[int, Path]]:
    """{limit: {count: path}} for every <base>_<limit>_<count><ext> beside ``base``."""
    folder = base.parent
    if not folder.is_dir():
        raise UsageError(f"folder {str(folder)!r} does not exist")
    pattern = re.compile(re.escape(base.stem) + r"_(\d+)_(\d+)" + re.escape(base.suffix) + "$")
    rows: dict[int, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        match = pattern.match(path.name)
        if match:
            limit, count = map(int, match.groups())
            if limit > MAX_STEPS or count > MAX_STEPS:
                raise UsageError(f"{path}: a run of {limit} steps is longer than any image2image.py run (at most {MAX_STEPS}); move the file away")
            rows.setdefault(limit, {})[count] = path
    return rows


def _open(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return images.to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UsageError(f"{path}: too large to open safely, a decompression bomb? ({cli.one_line(e)})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UsageError(f"{path}: cannot be read as an image ({cli.one_line(e)})") from None


def _parameters(path: Path) -> dict:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            text = images.read_parameters(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return {}  # an unreadable file is named when its pixels are read
    return images.parse_parameters(text) if text else {}


def check_rows(base: Path, rows: dict, seed_image: Path | None):
    """Name every missing or inconsistent file; returns (seed path, {limit: [paths in step order]})."""
    pattern = images.sibling(base, "<limit>", "<count>")
    seed = rows.pop(0, {})
    if set(seed) - {0}:
        bad = [str(p) for c, p in seed.items() if c]
        raise UsageError(f"inconsistent files: {', '.join(bad)} (a 0-step run has only the input {images.sibling(base, 0, 0)})")
    if not rows:
        raise UsageError(f"no files {pattern} found; run image2image.py -gt (or -sd N) with -o {base} first")
    seed_path = seed_image or seed.get(0)
    if seed_path is None:
        raise UsageError(f"missing {images.sibling(base, 0, 0)} (the input image, written by image2image.py -sd/-gt); or pass --seed_image PATH")
    if not Path(seed_path).is_file():
        raise UsageError(f"--seed_image {str(seed_path)!r} does not exist")

    missing, bad = [], []
    for limit, counts in sorted(rows.items()):
        bad += [str(p) for c, p in counts.items() if c > limit or c < 1]
        if limit not in counts:
            missing.append(str(images.sibling(base, limit, limit)))
        # -sd N runs store N in each file: every multiple of N must be there.
        every = {_parameters(p).get("Show denoising") for p in counts.values()} - {None}
        for n in {int(e) for e in every if str(e).isdigit() and int(e) > 0}:
            missing += [str(images.sibling(base, limit, c)) for c in range(n, limit, n) if c not in counts]
    if bad:
        raise UsageError(f"inconsistent files (step count beyond the run's length): {', '.join(bad)}")
    if missing:
        missing = sorted(set(missing))
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise UsageError(f"missing files: {', '.join(missing[:10])}{more}")
    ordered = {limit: [counts[c] for c in sorted(counts)] for limit, counts in sorted(rows.items())}
    return Path(seed_path), ordered


def check_same_run(paths: list[Path]):
    seeds = {}
    for path in paths:
        seed = _parameters(path).get("Seed")
        if seed is not None:
            seeds.setdefault(seed, path)
    if len(seeds) > 1:
        (s1, p1), (s2, p2) = list(seeds.items())[:2]
        raise UsageError(f"inconsistent files from different runs: {p1} has Seed {s1} but {p2} has Seed {s2}")


def layout(rows: dict[int, list], right_only: bool, full_triangle: bool):
    """(n_columns, {limit: [(column, index into [seed, *row]), ...]}) for the chosen layout."""
    longest = max(len(r) for r in rows.values())
    placed = {}
    for limit, row in rows.items():
        n = len(row)
        if right_only:
            cells = [(longest - n + j, 1 + j) for j in range(n)]
        elif full_triangle:
            centre = longest
            cells = [(centre, 0)] + [(centre + 1 + j, 1 + j) for j in range(n)] + [(centre - 1 - j, 1 + j) for j in range(n)]
        else:
            interim = [(1 + j, 1 + j) for j in range(n - 1)]
            cells = [(0, 0), *interim, (longest, n)]
        placed[limit] = cells
    n_columns = longest if right_only else 2 * longest + 1 if full_triangle else longest + 1
    return n_columns, placed


def _label(tile: Image.Image, text: str) -> Image.Image:
    tile = tile.copy()
    draw = ImageDraw.Draw(tile)
    font = ImageFont.load_default(size=max(10, tile.height // 12))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 3
    y = tile.height - (bottom - top) - 2 * pad
    draw.rectangle((0, y, right - left + 2 * pad, tile.height), fill=(0, 0, 0))
    draw.text((pad - left, y + pad - top), text, font=font, fill=(255, 255, 255))
    return tile


def check_canvas(output: Path, width: int, height: int):
    """Refuse a picture the output format cannot store or the machine cannot hold (3 bytes a pixel, twice: the canvas and its encoding)."""
    fmt = images.FORMATS[output.suffix.lower()]
    if max(width, height) > MAX_SIDE[fmt]:
        raise UsageError(f"the picture would be {width}x{height}; {fmt} stores at most {MAX_SIDE[fmt]} px a side; lower --scale")
    need, have = 2 * 3 * width * height, cli.available_memory()
    if need > have:
        raise UsageError(f"the picture would be {width}x{height}, at least {need / 1e9:.3g} GB of memory, more than this machine's {have / 1e9:.3g} GB; lower --scale")


def main(argv=None, prog: str = PROG):
    args = parse_args(argv, prog)
    if args.print_parser:
        print(args)
    base = Path(args.base).expanduser()
    if base.suffix.lower() not in images.FORMATS:
        raise UsageError(f"base {str(base)!r}: give the output file image2image.py wrote, with its extension (e.g. out.png)")
    if not 0 < args.scale < math.inf:
        raise UsageError(f"--scale must be a positive finite number (got {args.scale})")
    output = cli.check_output_path(args.output or str(images.sibling(base, "triangle")))
    seed_path, rows = check_rows(base, discover(base), Path(args.seed_image).expanduser() if args.seed_image else None)
    every_file = [p for row in rows.values() for p in row]
    check_same_run(every_file + ([] if args.seed_image else [seed_path]))

    tiles = {p: _open(p) for p in every_file}
    size = next(iter(tiles.values())).size
    odd = [f"{p} is {t.size[0]}x{t.size[1]}" for p, t in tiles.items() if t.size != size]
    if odd:
        raise UsageError(f"inconsistent tile sizes: {every_file[0]} is {size[0]}x{size[1]} but {'; '.join(odd)}")
    seed_tile = _open(seed_path)
    if seed_tile.size != size:
        if args.seed_image is None:
            raise UsageError(f"inconsistent tile sizes: {seed_path} is {seed_tile.size[0]}x{seed_tile.size[1]}, the others {size[0]}x{size[1]}")
        seed_tile = seed_tile.resize(size, Image.Resampling.LANCZOS)
    w, h = max(1, round(size[0] * args.scale)), max(1, round(size[1] * args.scale))

    def tile(image: Image.Image, text: str) -> Image.Image:
        image = image if (w, h) == image.size else image.resize((w, h), Image.Resampling.LANCZOS)
        return _label(image, text) if args.labels else image

    n_columns, placed = layout(rows, args.right_only, args.full_triangle)
    check_canvas(output, n_columns * w, len(rows) * h)
    canvas = Image.new("RGB", (n_columns * w, len(rows) * h), "white")
    for r, (limit, row) in enumerate(rows.items()):
        strength = _parameters(row[-1]).get("Denoising strength")  # A1111's key, as image2image writes it
        finale = f"{limit} steps" + (f", strength {strength}" if strength else "")
        sources = [tile(seed_tile, "input")]
        for j, path in enumerate(row):
            count = int(re.search(r"_(\d+)" + re.escape(path.suffix) + "$", path.name).group(1))
            sources.append(tile(tiles[path], finale if j == len(row) - 1 else f"{count}/{limit}"))
        for column, index in placed[limit]:
            canvas.paste(sources[index], (column * w, r * h))

    last = _parameters(rows[max(rows)][-1])
    text = images.read_parameters(rows[max(rows)][-1]) if last else None
    images.save_image(canvas, output, text)
    print(f"saved {output}: {len(rows)} rows x {n_columns} columns of {w}x{h} tiles")


def run(prog: str = PROG):
    """The command's entry point: errors are one line on stderr prefixed with ``prog``, exit status 2."""
    cli.run_cli(lambda: main(prog=prog), prog)


if __name__ == "__main__":
    run()
