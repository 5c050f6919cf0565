"""What GroupNorm costs a new process on CUDA, per implementation: first use of every shape, then speed.

The shapes are those the SD 2.1-base UNet (batch 2 = one image with CFG, 64x64 latent, float16) and its
VAE decoder (one 512x512 image, float32) pass through GroupNorm, collected by building both graphs
lazily (nothing is computed). Each implementation runs in two fresh processes that share a cache
folder for MLX's generated kernels (MLX_PTX_CACHE_DIR) and one for the driver's PTX JIT
(CUDA_CACHE_PATH), both empty before the first: "process 1" is a fresh machine, "process 2" the
next run. Implementations:

    templated    cuda_kernel with N, C, G as compile-time constants (what norm.py did before)
    runtime_jit  cuda_kernel with the sizes in an int array argument (one NVRTC compile per dtype)
    ptx          the package: precompiled_cuda_kernel from the shipped group_norm.ptx
    ptx256       the same with 256-thread statistics blocks (the package uses 1024)
    mlx_ops      MLX ops (column sums, float32) under mx.compile
    nn           nn.GroupNorm(pytorch_compatible=True) (+ nn.silu), the portable path

    python bench/groupnorm_coldstart.py [--impls ptx,runtime_jit,...] [--templated-shapes 6]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T0 = time.perf_counter()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def collect_shapes():
    """(shape, dtype, groups, eps, silu) of every GroupNorm call in one UNet step and one VAE decode."""
    import mlx.core as mx

    from unet_throughput import SD21_BASE
    from stable_diffusion import norm
    from stable_diffusion.config import AutoencoderConfig, UNetConfig
    from stable_diffusion.unet import UNetModel
    from stable_diffusion.vae import Autoencoder

    seen = []

    def record(self, x, silu=False):
        sig = (tuple(x.shape), str(x.dtype).split(".")[-1], self.num_groups, self.eps, bool(silu))
        if sig not in seen:
            seen.append(sig)
        return x

    original = norm.GroupNorm.__call__
    norm.GroupNorm.__call__ = record
    try:
        unet = UNetModel(UNetConfig.from_dict(SD21_BASE))
        unet.set_dtype(mx.float16)
        unet(mx.zeros((2, 64, 64, 4)), mx.array(999), mx.zeros((2, 77, 1024)))
        vae = Autoencoder(AutoencoderConfig.from_dict(dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32, latent_channels=4)))
        vae.decode(mx.zeros((1, 64, 64, 4)))
    finally:
        norm.GroupNorm.__call__ = original
    return seen


def make_impl(name):
    """fn(x, weight, bias, groups, eps, silu) -> y for one implementation."""
    import mlx.core as mx
    import mlx.nn as nn

    from stable_diffusion import norm

    if name == "ptx":
        return norm._cuda_group_norm
    if name == "ptx256":  # the same kernels, 256-thread statistics blocks
        return lambda x, w, b, groups, eps, silu: norm._cuda_group_norm(x, w, b, groups, eps, silu, stats_threads=256)
    if name == "nn":
        def portable(x, w, b, groups, eps, silu):
            gn = nn.GroupNorm(groups, x.shape[-1], eps=eps, pytorch_compatible=True)
            gn.weight, gn.bias = w, b
            y = gn(x)
            return nn.silu(y) if silu else y
        return portable
    if name == "mlx_ops":
        @mx.compile
        def ops(x, w, b, groups, eps, silu):
            B, H, W, C = x.shape
            xf = x.reshape(B, H * W, C).astype(mx.float32)
            count = H * W * (C // groups)
            mean = xf.sum(axis=1).reshape(B, groups, -1).sum(axis=-1) / count  # (B, G)
            mean_c = mx.repeat(mean, C // groups, axis=1)[:, None, :]  # (B, 1, C)
            var = mx.square(xf - mean_c).sum(axis=1).reshape(B, groups, -1).sum(axis=-1) / count
            rstd_c = mx.repeat(mx.rsqrt(var + eps), C // groups, axis=1)[:, None, :]
            y = (xf - mean_c) * rstd_c * w.astype(mx.float32) + b.astype(mx.float32)
            if silu:
                y = y * mx.sigmoid(y)
            return y.astype(x.dtype).reshape(B, H, W, C)
        return lambda x, w, b, groups, eps, silu: ops(x, w, b, groups, eps, silu)

    templated = name == "templated"
    dims = "" if templated else "const int N = dims[0], C = dims[1], G = dims[2]; const int B = dims[3];\n"
    stats = mx.fast.cuda_kernel(
        name=f"bench_gn_stats_{name}", input_names=["x", "eps"] + ([] if templated else ["dims"]),
        output_names=["mean_out", "rstd_out"], header=norm.DEVICE_SOURCE,
        source=dims + "sd_gn::stats<T>(x, mean_out, rstd_out, N, C, G, eps[0]);")
    apply = mx.fast.cuda_kernel(
        name=f"bench_gn_apply_{name}", input_names=["x", "mean", "rstd", "weight", "bias"] + ([] if templated else ["dims"]),
        output_names=["out"], header=norm.DEVICE_SOURCE,
        source=dims + "sd_gn::apply<T>(x, mean, rstd, weight, bias, out, B, N, C, G, SILU);")

    def jit(x, w, b, groups, eps, silu):
        B, H, W, C = x.shape
        N = H * W
        if templated:
            extra, tmpl = [], [("T", x.dtype), ("N", N), ("C", C), ("G", groups), ("B", B), ("SILU", int(silu))]
        else:
            extra, tmpl = [mx.array([N, C, groups, B], dtype=mx.int32)], [("T", x.dtype), ("SILU", int(silu))]
        mean, rstd = stats(inputs=[x, mx.array([eps], dtype=mx.float32), *extra],
                           template=[t for t in tmpl if t[0] != "SILU"], grid=(256, groups, B), threadgroup=(256, 1, 1),
                           output_shapes=[(B, groups)] * 2, output_dtypes=[mx.float32] * 2)
        (y,) = apply(inputs=[x, mean, rstd, w, b, *extra], template=tmpl, grid=(B * N * C // (16 // x.dtype.size), 1, 1),
                     threadgroup=(256, 1, 1), output_shapes=[x.shape], output_dtypes=[x.dtype])
        return y
    return jit


def child(args):
    import mlx.core as mx
    import mlx.nn as nn

    import stable_diffusion.norm  # noqa: F401

    t_import = time.perf_counter() - T0
    sigs = collect_shapes()
    impl = make_impl(args.child)
    if args.child == "templated":
        sigs = sigs[: args.templated_shapes]
    inputs = []
    for shape, dtype, groups, eps, silu in sigs:
        dt = getattr(mx, dtype)
        x = (3 + 2 * mx.random.normal(shape)).astype(dt)
        w, b = mx.random.normal((shape[-1],)).astype(dt), mx.random.normal((shape[-1],)).astype(dt)
        mx.eval(x, w, b)
        inputs.append((x, w, b, groups, eps, silu))
    firsts = []
    for x, w, b, groups, eps, silu in inputs:
        t = time.perf_counter()
        mx.eval(impl(x, w, b, groups, eps, silu))
        firsts.append(time.perf_counter() - t)
    # Speed (per call, 20 queued) and error on three shapes: UNet 64x64x320 fp16 (+SiLU), 16x16x1280 fp16, VAE 512x512x128 fp32 (+SiLU).
    speed = {}
    for shape, dtype, silu in [((2, 64, 64, 320), "float16", True), ((2, 16, 16, 1280), "float16", False), ((1, 512, 512, 128), "float32", True)]:
        dt = getattr(mx, dtype)
        x = (3 + 2 * mx.random.normal(shape)).astype(dt)
        w, b = mx.random.normal((shape[-1],)).astype(dt), mx.random.normal((shape[-1],)).astype(dt)
        mx.eval(x, w, b)
        mx.eval(impl(x, w, b, 32, 1e-5, silu))
        ts = []
        for _ in range(5):  # 20 calls queued at once: GPU time, launch overhead hidden
            t = time.perf_counter()
            mx.eval([impl(x, w, b, 32, 1e-5, silu) for _ in range(20)])
            ts.append((time.perf_counter() - t) / 20)
        t = time.perf_counter()
        outs = [impl(x, w, b, 32, 1e-5, silu) for _ in range(20)]
        host = (time.perf_counter() - t) / 20  # building the graph only
        mx.eval(outs)
        gn = nn.GroupNorm(32, shape[-1], eps=1e-5, pytorch_compatible=True)
        gn.weight, gn.bias = w.astype(mx.float32), b.astype(mx.float32)
        ref = gn(x.astype(mx.float32))
        ref = nn.silu(ref) if silu else ref
        err = (mx.abs(impl(x, w, b, 32, 1e-5, silu).astype(mx.float32) - ref).max() / mx.abs(ref).max()).item()
        speed["x".join(map(str, shape)) + f" {dtype}"] = {"ms": statistics.median(ts) * 1e3, "host_ms": host * 1e3, "rel_err": err}
    print("RESULT " + json.dumps({"import_s": t_import, "shapes": len(sigs), "first_use_total_s": sum(firsts),
                                  "first_use_max_s": max(firsts), "first_use_each_s": [round(f, 4) for f in firsts],
                                  "speed": speed, "signatures": [list(map(str, s)) for s in sigs] if args.print_shapes else None}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--impls", default="ptx,runtime_jit,mlx_ops,nn,templated")
    p.add_argument("--templated-shapes", type=int, default=6, help="shapes to time for 'templated' (~2 s each)")
    p.add_argument("--print-shapes", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    print("command: python " + " ".join(sys.argv))
    rows = {}
    for impl in args.impls.split(","):
        caches = Path(tempfile.mkdtemp(prefix=f"gn_{impl}_"))
        env = dict(os.environ, MLX_PTX_CACHE_DIR=str(caches / "mlx"), CUDA_CACHE_PATH=str(caches / "nv"))
        for proc in (1, 2):
            cmd = [sys.executable, __file__, "--child", impl, "--templated-shapes", str(args.templated_shapes)]
            if args.print_shapes and impl == "ptx" and proc == 1:
                cmd.append("--print-shapes")
            t = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
            if r.returncode or not lines:
                print(f"{impl} process {proc} failed ({r.returncode}):\n{r.stderr[-2500:]}")
                break
            res = json.loads(lines[-1][7:])
            res["process_wall_s"] = wall
            rows[(impl, proc)] = res
            print(f"{impl} p{proc}: {json.dumps(res)}", flush=True)
    print("\n| implementation | process | shapes | first use, all shapes (s) | slowest first use (s) | " + " | ".join(f"{k} (ms)" for k in next(iter(rows.values()))["speed"]) + " |")
    print("|---|---:|---:|---:|---:|" + "---:|" * 3)
    for (impl, proc), r in rows.items():
        print(f"| {impl} | {proc} | {r['shapes']} | {r['first_use_total_s']:.3f} | {r['first_use_max_s']:.3f} | "
              + " | ".join(f"{v['ms']:.3f} (host {v['host_ms']:.3f}, err {v['rel_err']:.1e})" for v in r["speed"].values()) + " |")


if __name__ == "__main__":
    main()
