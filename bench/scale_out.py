"""Data-parallel scaling of a many-image job over K GPUs (mlx.launch, NCCL): images/s and efficiency.

One launch of N ranks measures K = 1, 2, 4, ... N in turn on the same warm processes (MLX's CUDA
kernels are compiled once per process, 60-110 s, so a fresh launch per K would mostly time the
JIT): for each K, ranks 0..K-1 run the job's batches b with b mod K == rank exactly as
``stable_diffusion.distributed.run`` does (the same batches, per-seed noise, decode, PNG writes and
one all_sum per round), the other ranks wait in the same all_sums. Throughput is images / wall time
between two barriers; efficiency is throughput(K) / (K x throughput(1)). The files of every K are
then compared pixel for pixel with K = 1's.

    python3 bench/scale_out.py --make-model /tmp/sd21                       # random SD 2.1-base weights
    mlx.launch -n 4 --backend nccl -- python3 bench/scale_out.py --model /tmp/sd21 --images 64
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PROMPT = "a photograph of an astronaut riding a horse"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--make-model", default=None, help="write random SD 2.1-base weights (bench/generate.py's recipe) to this folder and exit")
    p.add_argument("--tokenizer", default=str(ROOT / "bench" / "_tokenizer"), help="tokenizer folder for --make-model")
    p.add_argument("--tiny", action="store_true", help="toy-width model (CPU smoke test)")
    p.add_argument("--model", default=None, help="the model folder")
    p.add_argument("--images", type=int, default=64, help="images in the job")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--ks", default=None, help="numbers of ranks to measure, comma-separated (default: 1, 2, 4, ... up to the launch's size)")
    p.add_argument("--out", default="/tmp/scale_out", help="folder for the images")
    p.add_argument("--json", default=None, help="rank 0 writes the numbers here")
    return p.parse_args()


def main():
    args = parse_args()
    if args.make_model:
        from generate import make_model

        t0 = time.perf_counter()
        make_model(Path(args.make_model), Path(args.tokenizer), args.tiny)
        print(f"wrote the random model in {time.perf_counter() - t0:.0f} s")
        return

    import mlx.core as mx
    import numpy as np

    from stable_diffusion import distributed, images
    from stable_diffusion.pipeline import StableDiffusion

    group = distributed.Group()
    lead = group.rank == 0
    ks = [int(k) for k in args.ks.split(",")] if args.ks else [k for k in (1, 2, 4, 8, 16) if k <= group.size]
    if max(ks) > group.size:
        sys.exit(f"--ks {args.ks}: the launch has only {group.size} ranks")
    t_load = time.perf_counter()
    sd = StableDiffusion(args.model, float16=True)
    sd.ensure_models_are_loaded()
    latent = args.size // 8
    shape = (latent, latent, sd.unet.config.in_channels)
    items = distributed.make_items(1, list(range(args.images)))
    batches = distributed.make_batches(items, args.batch_size)

    def run_batch(batch, steps, folder: Path):
        seeds = [it.seed for it in batch]
        x = None
        for x in sd.generate_latents(PROMPT, n_images=len(batch), num_steps=steps, cfg_weight=7.5, latents=distributed.initial_noise(seeds, shape), step_noise=distributed.step_noise(seeds, steps)):
            mx.eval(x)
        pictures = images.to_uint8(sd.decode(x, batch_size=1))
        for it, picture in zip(batch, pictures):
            images.save_image(picture, folder / f"img_{it.k}.png", f"Seed: {it.seed}")

    warm = Path(args.out) / f"warmup_{group.rank}"
    warm.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_batch(batches[0], 2, warm)  # compiles every kernel of this batch shape (MLX JIT on CUDA)
    if len(batches[-1]) != len(batches[0]):
        run_batch(batches[-1], 2, warm)
    warm_s = time.perf_counter() - t0
    group.all_sum(np.zeros(1, dtype=np.int64))
    if lead:
        print(f"{group.size} ranks; model loaded in {t0 - t_load:.1f} s, warm-up {warm_s:.1f} s (rank 0)", flush=True)

    results = []
    for k in ks:
        folder = Path(args.out) / f"k{k}"
        folder.mkdir(parents=True, exist_ok=True)
        group.all_sum(np.zeros(1, dtype=np.int64))  # barrier
        t0 = time.perf_counter()
        rounds = -(-len(batches) // k)
        for r in range(rounds):
            b = r * k + group.rank
            done = 0
            if group.rank < k and b < len(batches):
                run_batch(batches[b], args.steps, folder)
                done = len(batches[b])
            group.all_sum(np.array([done], dtype=np.int64))  # the progress all_sum of distributed.run
        group.all_sum(np.zeros(1, dtype=np.int64))
        seconds = time.perf_counter() - t0
        results.append({"k": k, "images": len(items), "seconds": seconds, "images_per_s": len(items) / seconds})
        if lead:
            print(f"K={k}: {len(items)} images in {seconds:.2f} s = {len(items) / seconds:.3f} images/s", flush=True)

    if not lead:
        os._exit(0)
    base = results[0]["images_per_s"] / results[0]["k"]
    card = "?"
    try:
        import torch

        card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    except ImportError:
        pass

    def pixels(path):
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    same = {}
    for r in results[1:]:
        same[r["k"]] = sum(np.array_equal(pixels(Path(args.out) / f"k{ks[0]}" / f"img_{it.k}.png"), pixels(Path(args.out) / f"k{r['k']}" / f"img_{it.k}.png")) for it in items)
    print(f"\n{card} x {group.size}, mlx {mx.__version__}, random SD 2.1-base weights, {args.size}x{args.size}, {args.steps} steps, CFG 7.5, Euler, fp16, batch {args.batch_size}, {len(items)} images")
    print("| K | seconds | images/s | efficiency | files identical to K=%d |" % ks[0])
    print("|---:|---:|---:|---:|---:|")
    for r in results:
        r["efficiency"] = r["images_per_s"] / (r["k"] * base)
        ident = f"{same[r['k']]}/{len(items)}" if r["k"] in same else "-"
        print(f"| {r['k']} | {r['seconds']:.2f} | {r['images_per_s']:.3f} | {r['efficiency']:.3f} | {ident} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "ranks": group.size, "argv": sys.argv, "warmup_s": warm_s, "results": results, "identical": same}, indent=1))
    sys.stdout.flush()
    os._exit(0)  # skip the NCCL teardown at exit; every rank is past its last collective


if __name__ == "__main__":
    main()
