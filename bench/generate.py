"""End-to-end text-to-image time and peak memory: our MLX pipeline against diffusers' StableDiffusionPipeline.

Both load the same files: the random SD 2.1-base model of ``bench/_models.py`` (UNet, VAE, CLIP text
encoder with the real config.json values, float16 safetensors, diffusers layout) written once by
``--make-model``, with the real CLIP BPE tokenizer. ``--write-tokenizer DIR`` writes the tokenizer of
every family (``DIR/pad_eos``, ``DIR/pad_bang``) on a machine that has open_clip; ``bench/coldstart.py``
and ``bench/scale_out.py`` read the same folder. Each implementation runs in its own fresh process:
"cold" is process start -> first image (imports, weight load, any compilation, 1 image), "warm" is
the second run of each batch in that process. 50 steps, classifier-free guidance 7.5, Euler (both),
512x512, text encoding + denoising + VAE decoding to host images. Peak memory: ``mx.get_peak_memory()``
vs ``torch.cuda.max_memory_allocated()`` over each warm run (weights included).

    python bench/generate.py --write-tokenizer bench/_tokenizer        # here (needs open_clip_torch)
    python bench/generate.py --make-model /tmp/sd21 --images 1,16      # GPU machine, carrying bench/_tokenizer
    python bench/generate.py --make-model /tmp/g --tiny --images 1     # CPU smoke test
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _models

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photograph of an astronaut riding a horse"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--write-tokenizer", default=None, help="write the CLIP tokenizers of every family (pad_eos/, pad_bang/) under this folder and exit")
    p.add_argument("--make-model", default=None, help="write the random model to this folder (skipped when it exists), then benchmark it")
    p.add_argument("--model", default=None, help="an existing diffusers-format model folder to benchmark")
    p.add_argument("--tokenizer", default=str(ROOT / "bench" / "_tokenizer"), help="the --write-tokenizer folder, for --make-model")
    p.add_argument("--tiny", action="store_true", help="toy-width model (CPU smoke test)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 512; 64 with --tiny)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--images", default="1,16", help="images per run (warm), comma-separated")
    p.add_argument("--impl", default="mlx,diffusers", help="implementations to run")
    p.add_argument("--mx-compile", action="store_true", help="MLX: mx.compile the UNet call (compilation counts in the cold start)")
    p.add_argument("--json", default=None, help="write all numbers to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def make_model(folder: Path, tokenizer: Path, tiny: bool):
    """The random SD 2.1-base model (``bench/_models.py``); ``tokenizer`` is the ``--write-tokenizer`` folder."""
    _models.make_model(folder, tokenizer, "sd21", tiny)


def child_mlx(args):
    sys.path.insert(0, str(ROOT))
    import mlx.core as mx
    import numpy as np

    from stable_diffusion.pipeline import StableDiffusion

    sd = StableDiffusion(args.model, float16=True)
    if args.mx_compile:
        sd.unet = _Compiled(sd.unet, mx.compile(sd.unet))
    latent = args.size // 8

    def generate(n):
        x = None
        for x in sd.generate_latents(PROMPT, n_images=n, num_steps=args.steps, cfg_weight=7.5, latent_size=(latent, latent), seed=0):
            mx.eval(x)
        images = sd.decode(x)
        return (np.array(images) * 255).round().astype(np.uint8)

    return generate, mx.reset_peak_memory, mx.get_peak_memory, lambda: None


class _Compiled:
    """The UNet with its call compiled; attributes (config, ...) still read from the module."""

    def __init__(self, module, fn):
        self._module, self._fn = module, fn

    def __call__(self, *a):
        return self._fn(*a)

    def __getattr__(self, name):
        return getattr(self._module, name)


def child_diffusers(args):
    import torch
    from diffusers import StableDiffusionPipeline

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if dev == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False).to(dev)
    pipe.set_progress_bar_config(disable=True)

    def generate(n):
        g = torch.Generator(dev).manual_seed(0)
        out = pipe(PROMPT, num_images_per_prompt=n, num_inference_steps=args.steps, guidance_scale=7.5, height=args.size, width=args.size, generator=g, output_type="np")
        return (out.images * 255).round().astype("uint8")

    cuda = dev == "cuda"
    reset = torch.cuda.reset_peak_memory_stats if cuda else (lambda: None)
    peak = torch.cuda.max_memory_allocated if cuda else (lambda: 0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    return generate, reset, peak, sync


def run_child(args):
    """In a fresh process: first image (cold), then each batch twice; report the second."""
    generate, reset_peak, peak, sync = (child_mlx if args.child == "mlx" else child_diffusers)(args)
    images = generate(1)
    sync()
    result = {"cold_s": time.time() - args.t0, "first_image_shape": list(images.shape)}
    for n in [int(v) for v in args.images.split(",")]:
        generate(n)
        sync()
        reset_peak()
        t0 = time.perf_counter()
        images = generate(n)
        sync()
        result[f"warm_{n}_s"] = time.perf_counter() - t0
        result[f"peak_{n}_bytes"] = peak()
        result[f"images_{n}_finite_mean"] = float(images.mean())
    print("RESULT " + json.dumps(result), flush=True)


def main():
    args = parse_args()
    if args.size is None:
        args.size = 64 if args.tiny else 512
    if args.write_tokenizer:
        _models.write_tokenizers(Path(args.write_tokenizer))
        return
    if args.child:
        run_child(args)
        return
    if args.make_model:
        if not (Path(args.make_model) / "model_index.json").exists():
            t0 = time.perf_counter()
            make_model(Path(args.make_model), Path(args.tokenizer), args.tiny)
            print(f"wrote the random model in {time.perf_counter() - t0:.0f} s")
        args.model = args.make_model
    if not args.model:
        sys.exit("give --make-model or --model")

    import mlx.core as mx
    import torch
    import diffusers

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"card: {card}; mlx {mx.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}")
    print("command: python " + " ".join(sys.argv))
    results = {}
    for impl in args.impl.split(","):
        cmd = [sys.executable, __file__, "--child", impl, "--model", args.model, "--size", str(args.size), "--steps", str(args.steps), "--images", args.images]
        if args.mx_compile:
            cmd.append("--mx-compile")
        t0 = time.time()
        proc = subprocess.run(cmd + ["--t0", repr(t0)], capture_output=True, text=True, env=os.environ)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{impl} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            continue
        results[impl] = json.loads(lines[-1][len("RESULT "):])
        print(f"  {impl}: {json.dumps(results[impl])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "argv": sys.argv, "results": results}, indent=1))

    sizes = [int(v) for v in args.images.split(",")]
    print(f"\n{card}, random SD 2.1-base weights, {args.size}x{args.size}, {args.steps} steps, CFG 7.5, Euler, fp16{' (MLX UNet under mx.compile)' if args.mx_compile else ''}")
    print("| | " + " | ".join(results) + " |" + (" MLX/diffusers |" if len(results) == 2 else ""))
    print("|---|" + "---:|" * (len(results) + (len(results) == 2)))
    rows = [("cold start -> first image (s)", "cold_s", 1)]
    rows += [(f"warm, {n} image{'s' if n > 1 else ''} (s)", f"warm_{n}_s", 1) for n in sizes]
    rows += [(f"peak memory, {n} image{'s' if n > 1 else ''} (GB)", f"peak_{n}_bytes", 1e-9) for n in sizes]
    for label, key, scale in rows:
        vals = [r.get(key, float("nan")) * scale for r in results.values()]
        s = f"| {label} | " + " | ".join(f"{v:.2f}" for v in vals) + " |"
        if len(vals) == 2:
            s += f" {vals[0] / vals[1]:.2f}x |" if vals[1] else " - |"
        print(s)


if __name__ == "__main__":
    main()
