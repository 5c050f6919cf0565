"""Before/after of each UNet throughput lever (issue 13), every variant in its own process, in one run.

A variant is a copy of the ``stable_diffusion`` package (a folder holding it: the current tree, or an
older commit unpacked with ``git archive``), what ``fuse_projections`` it runs (none, the time
embeddings, the attention projections, or all), and MLX's ``MLX_MAX_OPS_PER_BUFFER`` (how many
kernels go into one CUDA graph; read once per process). Each child builds the SD 2.1-base UNet with
MLX's random init in float16, then times one classifier-free-guidance step (UNet batch = 2 x images)
at each batch size: median of ``--repeats`` steps after ``--warmup``. The variants run in rounds
(every variant once per round, in order), so drift on the machine shows up as a spread between
rounds rather than as a difference between variants.

    git archive 1ad9138 stable_diffusion | tar -x -C bench/_variants/before   # here
    python bench/levers.py --before bench/_variants/before --rounds 2        # on the GPU machine
    python bench/levers.py --config tiny --latent 8 --batch-sizes 1 --rounds 1   # CPU smoke test
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUSE = {"none": [], "time": ["time"], "attention": ["attention"], "all": ["time", "attention"]}


def child(args):
    sys.path.insert(0, args.package)
    import mlx.core as mx
    import mlx.utils

    from stable_diffusion.config import UNetConfig
    from stable_diffusion.unet import Attention, UNetModel

    if args.mlx_graph_default:
        # The package sets MLX_MAX_OPS_PER_BUFFER on import; MLX reads it at its first GPU work, which
        # has not happened yet, so dropping it here gives MLX's own default.
        os.environ.pop("MLX_MAX_OPS_PER_BUFFER", None)

    sys.path.insert(0, str(ROOT / "bench"))
    from unet_throughput import CONFIGS, CONTEXT_DIM

    cfg = CONFIGS[args.config]
    mx.random.seed(0)
    model = UNetModel(UNetConfig.from_dict(cfg))
    model.set_dtype(mx.float16)
    # Small weights keep float16 activations finite through 25 layers of MLX's default init.
    model.update(mlx.utils.tree_map(lambda w: w * 0.2, model.parameters()))
    mx.eval(model.parameters())
    if "time" in FUSE[args.fuse]:
        model._time_projections.fuse()
    if "attention" in FUSE[args.fuse]:
        for _, module in model.named_modules():
            if isinstance(module, Attention):
                module.fuse_projections()
    step = mx.compile(model) if args.compile else model
    latent = args.latent or cfg["sample_size"]
    out = {}
    for b in [int(v) for v in args.batch_sizes.split(",")]:
        x = mx.random.normal((2 * b, latent, latent, 4)).astype(mx.float16)
        ctx = mx.random.normal((2 * b, 77, CONTEXT_DIM[args.config])).astype(mx.float16)
        t = mx.array(500.0)
        mx.eval(x, ctx)
        for _ in range(args.warmup):
            y = step(x, t, ctx)
            mx.eval(y)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            mx.eval(step(x, t, ctx))
            times.append(time.perf_counter() - t0)
        out[b] = b / statistics.median(times)
        finite = bool(mx.isfinite(y).all().item())
        print(f"  batch {b}: {out[b]:.1f} im/s (finite output: {finite})", file=sys.stderr, flush=True)
        mx.clear_cache()
    print("RESULT " + json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--before", default=None, help="folder holding the package before the levers (git archive of the old commit)")
    p.add_argument("--config", default="sd21", help="UNet config of bench/unet_throughput.py")
    p.add_argument("--batch-sizes", default="1,2,4,8,16")
    p.add_argument("--latent", type=int, default=None, help="latent side (default: the config's sample_size)")
    p.add_argument("--max-ops", default="", help="extra MLX_MAX_OPS_PER_BUFFER values (or OPS:MB, adding MLX_MAX_MB_PER_BUFFER) to run with every lever on, e.g. 40,80,40:100")
    p.add_argument("--with-compile", action="store_true", help="add a variant with every lever on and mx.compile(unet)")
    p.add_argument("--graph-variants-only", action="store_true", help="skip the single-fusion variants")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--package", default=str(ROOT), help=argparse.SUPPRESS)
    p.add_argument("--fuse", default="none", choices=sorted(FUSE), help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mlx-graph-default", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return

    # (label, package folder, fuse, MLX_MAX_OPS_PER_BUFFER or None for MLX's default, mx.compile the UNet)
    variants = []
    if args.before:
        variants.append(("before (1ad9138)", args.before, "none", None, False))
    if not args.graph_variants_only:
        variants += [
            ("+ fused elementwise (conv bias + residual/temb, GEGLU)", str(ROOT), "none", None, False),
            ("+ one matmul for all time_emb_proj", str(ROOT), "time", None, False),
            ("+ fused attention projections (no time fusion)", str(ROOT), "attention", None, False),
        ]
    variants.append(("+ both fusions (fuse_projections)", str(ROOT), "all", None, False))
    for value in filter(None, args.max_ops.split(",")):  # "40" or "40:100" (ops, and MLX_MAX_MB_PER_BUFFER)
        ops, _, mb = value.partition(":")
        label = f"+ both, MLX_MAX_OPS_PER_BUFFER={ops}" + (f", MLX_MAX_MB_PER_BUFFER={mb}" if mb else "")
        variants.append((label, str(ROOT), "all", value, False))
    if args.with_compile:
        variants.append(("+ both, mx.compile(unet)", str(ROOT), "all", None, True))
    print("command: python " + " ".join(sys.argv), flush=True)
    results = {label: [] for label, *_ in variants}
    for r in range(args.rounds):
        for label, package, fuse, max_ops, compiled in variants:
            env = dict(os.environ)
            env.pop("MLX_MAX_OPS_PER_BUFFER", None)
            env.pop("MLX_MAX_MB_PER_BUFFER", None)
            if max_ops:
                ops, _, mb = max_ops.partition(":")
                env["MLX_MAX_OPS_PER_BUFFER"] = ops
                if mb:
                    env["MLX_MAX_MB_PER_BUFFER"] = mb
            cmd = [sys.executable, __file__, "--child", "--package", package, "--fuse", fuse, "--config", args.config,
                   "--batch-sizes", args.batch_sizes, *(["--latent", str(args.latent)] if args.latent else []), "--warmup", str(args.warmup), "--repeats", str(args.repeats), *(["--compile"] if compiled else []),
                   *([] if max_ops else ["--mlx-graph-default"])]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                print(f"round {r + 1} {label}: FAILED ({proc.returncode})\n{proc.stderr[-2000:]}", flush=True)
                continue
            row = {int(k): v for k, v in json.loads(lines[-1][7:]).items()}
            results[label].append(row)
            print(f"round {r + 1} {label} ({time.time() - t0:.0f} s): " + ", ".join(f"b{b} {v:.1f}" for b, v in row.items()), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"argv": sys.argv, "results": results}, indent=1))

    batches = [int(v) for v in args.batch_sizes.split(",")]
    base = results[variants[0][0]]
    print(f"\nimages/s, {args.config} fp16 eager, median of {args.repeats} steps; best of {args.rounds} rounds (range in brackets); "
          f"x = ratio to the first row's best")
    print("| variant | " + " | ".join(f"batch {b}" for b in batches) + " |")
    print("|---|" + "---:|" * len(batches))
    for label, rows in results.items():
        cells = []
        for b in batches:
            vals = [row[b] for row in rows if b in row]
            if not vals:
                cells.append("-")
                continue
            ref = max((row[b] for row in base if b in row), default=None)
            ratio = f" {max(vals) / ref:.2f}x" if ref else ""
            cells.append(f"{max(vals):.1f} [{min(vals):.1f}-{max(vals):.1f}]{ratio}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
