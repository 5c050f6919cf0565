"""Peak memory of loading each full-size preset in float16: ``mx.get_peak_memory()`` after every weight is read.

Each preset's folder is laid out like its Hub repo with random weights of the real shapes
(tests/real_models.py), loaded through ``load_model(folder, float16=True)``; then
``ensure_models_are_loaded()`` evaluates every parameter. One process per preset, so each peak
starts from zero. Writes the weights (~34 GB) under --weights unless they are already there.

    python bench/load_memory.py --weights /tmp/sd_weights            # all presets
    python bench/load_memory.py --weights /tmp/sd_weights --presets sdxl-turbo --keep
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import real_models  # noqa: E402


def measure(folder: Path) -> dict:
    """In this process: load the folder in float16, read every weight, report the peak."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from stable_diffusion import load_model

    loaded, load = [], mx.load

    def recording_load(file, *args, **kwargs):
        loaded.append(str(Path(file).relative_to(folder)))
        return load(file, *args, **kwargs)

    mx.load = recording_load
    start = time.perf_counter()
    sd = load_model(str(folder), float16=True)
    sd.ensure_models_are_loaded()
    seconds = time.perf_counter() - start
    params = sum(v.nbytes for m in sd._models() for _, v in tree_flatten(m.parameters()))
    return dict(
        peak_gb=mx.get_peak_memory() / 1e9,
        active_gb=mx.get_active_memory() / 1e9,
        parameters_gb=params / 1e9,
        seconds=seconds,
        files=sorted(loaded),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(real_models.PRESETS), choices=real_models.PRESETS)
    parser.add_argument("--weights", type=Path, required=True, help="folder for the weight files (one subfolder per architecture)")
    parser.add_argument("--keep", action="store_true", help="keep the weights and preset folders afterwards")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return

    from tiny_models import write_clip_vocab

    presets_root = Path(tempfile.mkdtemp(prefix="load_memory_", dir=args.weights.parent))
    vocab = write_clip_vocab(presets_root / "vocab")
    results = {}
    try:
        for preset in args.presets:
            weights = args.weights / real_models.ARCH[preset]
            if not weights.is_dir():
                real_models.build_weights(real_models.ARCH[preset], weights)
            folder = real_models.write_folder(preset, presets_root / preset, vocab, weights)
            out = subprocess.run([sys.executable, __file__, "--weights", str(args.weights), "--child", str(folder)], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{preset}: {out.stderr[-2000:]}")
            results[preset] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[preset]
            print(f"{preset:12s} peak {r['peak_gb']:6.2f} GB  parameters {r['parameters_gb']:6.2f} GB  {r['seconds']:5.1f} s  {', '.join(r['files'])}", flush=True)
    finally:
        shutil.rmtree(presets_root, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(args.weights, ignore_errors=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
