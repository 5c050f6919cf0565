"""UNet throughput: our MLX UNet against diffusers' UNet2DConditionModel, same weights, same process.

Images per second through one denoising step with classifier-free guidance (two latents per
image), random weights (no download), the real SD config.json values written inline. Both models
get identical weights: diffusers builds and initialises the model, and its state dict goes through
our ``UNetModel.sanitize`` into the MLX model. Each timing is the median of repeated steps after a
warm-up, synchronised (``mx.eval`` / ``torch.cuda.synchronize``). The card's matrix-multiply peak
is measured in the same run (a large torch matmul), and "% of peak" is the MLX rate in FLOP/s
over it. FLOPs per latent come from ``torch.utils.flop_counter`` on the diffusers model (convs,
matmuls, attention), 804 GFLOP for SD 2.1-base at 64x64.

    python bench/unet_throughput.py                       # SD 2.1-base, 512x512, fp16, batch 1..16
    python bench/unet_throughput.py --torch-compile       # adds diffusers under torch.compile
    python bench/unet_throughput.py --config tiny --size 64 --batch-sizes 1,2   # CPU smoke test
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from stable_diffusion.config import UNetConfig  # noqa: E402
from stable_diffusion.unet import UNetModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _models  # noqa: E402  (each model's unet/config.json values, shared with coldstart.py)

SD21_BASE = _models.SD21["unet"]
SD15 = _models.SD15["unet"]
SDXL = _models.SDXL["unet"]
TINY = {  # SD 2.1-base's layout at toy width, for smoke tests on a CPU
    **SD21_BASE,
    "attention_head_dim": [2, 4, 4, 4],
    "block_out_channels": [32, 64, 64, 64],
    "cross_attention_dim": 64,
}
CONFIGS = {"sd21": SD21_BASE, "sd15": SD15, "sdxl": SDXL, "tiny": TINY}
CONTEXT_DIM = {"sd21": 1024, "sd15": 768, "sdxl": 2048, "tiny": 64}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="sd21", help="UNet config")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (latent = size / 8); default: the config's")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="weights and activations")
    p.add_argument("--batch-sizes", default="1,2,4,6,8,12,16", help="images per step (UNet batch = 2x with CFG)")
    p.add_argument("--mx-compile", choices=["on", "off", "both"], default="both", help="mx.compile the UNet call")
    p.add_argument("--torch", choices=["on", "off"], default="on", help="also time diffusers (eager)")
    p.add_argument("--torch-compile", action="store_true", help="also time diffusers under torch.compile (default mode)")
    p.add_argument("--torch-compile-batches", default="", help="only at these batch sizes (default: all); each costs ~45 s of compilation")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per measurement")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per measurement (median reported)")
    p.add_argument("--profile", action="store_true", help="per-op-type time breakdown for both frameworks at the largest batch")
    p.add_argument("--trace", default="", help="batch sizes at which to list GPU kernels (CUPTI, via torch.profiler) of one MLX and one torch step")
    p.add_argument("--json", default=None, help="write all numbers to this file")
    p.add_argument("--fuse", choices=["on", "off"], default="on", help="UNetModel.fuse_projections() before timing (as the pipeline does)")
    p.add_argument("--group-norm", choices=["package", "templated", "portable"], default="package",
                   help="GroupNorm on CUDA: the package's precompiled kernels, the same kernels NVRTC-compiled per shape "
                        "(before issue 13), or nn.GroupNorm")
    return p.parse_args()


def torch_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def median_time(step, warmup, repeats, sync_fn):
    for _ in range(warmup):
        step()
    sync_fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        sync_fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def matmul_peak(dtype_name, dev):
    """FLOP/s of a large torch matmul on random data (median of 20), and the same through MLX."""
    import torch

    n = 8192 if dev.type == "cuda" else 1024
    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    if dev.type == "cpu" and tdt != torch.float32:
        tdt = torch.float32  # CPU half matmuls are emulated; the fp32 rate is the CPU's ceiling
    a, b = (torch.randn(n, n, device=dev, dtype=tdt) for _ in range(2))
    sec, _ = median_time(lambda: torch.mm(a, b), 5, 20, lambda: sync(dev))
    torch_rate = 2 * n**3 / sec
    mdt = {torch.float16: mx.float16, torch.bfloat16: mx.bfloat16, torch.float32: mx.float32}[tdt]
    ma, mb = (mx.random.normal((n, n)).astype(mdt) for _ in range(2))
    mx.eval(ma, mb)
    sec, _ = median_time(lambda: mx.eval(ma @ mb), 5, 20, lambda: None)
    return torch_rate, 2 * n**3 / sec, str(tdt).replace("torch.", "")


def build_models(cfg, dtype_name, dev):
    """diffusers' UNet with its own random init, and our MLX UNet holding the same values."""
    import torch
    from diffusers import UNet2DConditionModel

    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    mdt = {"fp16": mx.float16, "bf16": mx.bfloat16, "fp32": mx.float32}[dtype_name]
    torch.manual_seed(0)
    with torch.device(dev):
        ref = UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    ref = ref.to(tdt).eval()
    ours = UNetModel(UNetConfig.from_dict(cfg))
    weights = {k: mx.array(v.detach().float().cpu().numpy()).astype(mdt) for k, v in ref.state_dict().items()}
    ours.load_weights(list(ours.sanitize(weights).items()), strict=True)
    ours.set_dtype(mdt)
    mx.eval(ours.parameters())
    return ref, ours, tdt, mdt


def flops_per_latent(ref, inputs_torch):
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x, t, ctx, added = inputs_torch
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        ref(x[:1], t[:1], encoder_hidden_states=ctx[:1], added_cond_kwargs=_slice(added, 1))
    return counter.get_total_flops()


def _slice(added, n):
    return None if added is None else {k: v[:n] for k, v in added.items()}


def make_inputs(cfg_name, cfg, latent, n, dev, tdt, mdt, seed=0):
    """n latents: NCHW torch tensors and the same values NHWC in MLX."""
    import torch

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cfg["in_channels"], latent, latent), dtype=np.float32)
    t = np.full((n,), 500.0, dtype=np.float32)
    ctx = rng.standard_normal((n, 77, CONTEXT_DIM[cfg_name]), dtype=np.float32)
    tt = lambda a: torch.from_numpy(a).to(dev, tdt)  # noqa: E731
    torch_in = [tt(x), torch.from_numpy(t).to(dev), tt(ctx), None]
    mlx_in = [mx.array(x.transpose(0, 2, 3, 1)).astype(mdt), mx.array(t), mx.array(ctx).astype(mdt), None]
    if cfg.get("addition_embed_type") == "text_time":
        pooled = rng.standard_normal((n, 1280), dtype=np.float32)
        size = latent * 8
        ids = np.tile(np.array([[size, size, 0, 0, size, size]], dtype=np.float32), (n, 1))
        torch_in[3] = {"text_embeds": tt(pooled), "time_ids": tt(ids)}
        mlx_in[3] = (mx.array(pooled).astype(mdt), mx.array(ids).astype(mdt))
    return torch_in, mlx_in


def profile(ours, ref, mlx_in, torch_in, dev):
    """Per-op-type seconds for one step in each framework, each op synchronised on its own."""
    import torch
    import torch.nn.functional as F
    import mlx.nn as mnn

    from stable_diffusion import unet as unet_mod

    # MLX: wrap the leaf module types and the attention kernel; evaluate around each call.
    acc = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            mx.eval([v for v in a if isinstance(v, mx.array)])
            t0 = time.perf_counter()
            out = fn(*a, **k)
            mx.eval(out)
            acc[name] = acc.get(name, 0.0) + time.perf_counter() - t0
            return out

        return wrapper

    saved = {}
    for cls, name in [(mnn.GroupNorm, "GroupNorm"), (mnn.Conv2d, "Conv2d"), (mnn.Linear, "Linear"), (mnn.LayerNorm, "LayerNorm"), (unet_mod.GEGLU, "GEGLU(incl. proj)")]:
        saved[cls] = cls.__call__
        cls.__call__ = (lambda f, n: lambda self, *a, **k: timed(n, lambda *a2, **k2: f(self, *a2, **k2))(*a, **k))(cls.__call__, name)
    saved_sdpa = mx.fast.scaled_dot_product_attention
    unet_mod.mx.fast.scaled_dot_product_attention = timed("SDPA", saved_sdpa)
    try:
        x, t, ctx, tt = mlx_in
        for _ in range(2):
            acc.clear()
            t0 = time.perf_counter()
            mx.eval(ours(x, t, ctx, tt))
            total = time.perf_counter() - t0
    finally:
        for cls, f in saved.items():
            cls.__call__ = f
        unet_mod.mx.fast.scaled_dot_product_attention = saved_sdpa
    # GEGLU's time includes its Linear; report the activation part alone.
    mlx_prof = dict(acc)
    mlx_prof["total (synced per op)"] = total

    # torch: forward hooks on the same module types, and a wrapped SDPA.
    tacc, starts = {}, {}
    import diffusers.models.activations as acts

    def pre(name):
        def hook(mod, inp):
            sync(dev)
            starts[id(mod)] = time.perf_counter()

        return hook

    def post(name):
        def hook(mod, inp, out):
            sync(dev)
            tacc[name] = tacc.get(name, 0.0) + time.perf_counter() - starts[id(mod)]

        return hook

    handles = []
    for mod in ref.modules():
        for cls, name in [(torch.nn.GroupNorm, "GroupNorm"), (torch.nn.Conv2d, "Conv2d"), (torch.nn.Linear, "Linear"), (torch.nn.LayerNorm, "LayerNorm"), (acts.GEGLU, "GEGLU(incl. proj)")]:
            if isinstance(mod, cls):
                handles += [mod.register_forward_pre_hook(pre(name)), mod.register_forward_hook(post(name))]
    saved_tsdpa = F.scaled_dot_product_attention

    def tsdpa(*a, **k):
        sync(dev)
        t0 = time.perf_counter()
        out = saved_tsdpa(*a, **k)
        sync(dev)
        tacc["SDPA"] = tacc.get("SDPA", 0.0) + time.perf_counter() - t0
        return out

    F.scaled_dot_product_attention = tsdpa
    try:
        x, t, ctx, added = torch_in
        with torch.inference_mode():
            for _ in range(2):
                tacc.clear()
                sync(dev)
                t0 = time.perf_counter()
                ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added)
                sync(dev)
                total = time.perf_counter() - t0
    finally:
        F.scaled_dot_product_attention = saved_tsdpa
        for h in handles:
            h.remove()
    torch_prof = dict(tacc)
    torch_prof["total (synced per op)"] = total
    return mlx_prof, torch_prof


def kernel_trace(label, step, dev, steps=3, top=14):
    """GPU kernels of `steps` calls of `step` (any framework in this process: CUPTI sees them all)."""
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile

    step()
    sync(dev)
    t0 = time.perf_counter()
    with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync(dev)
    wall = (time.perf_counter() - t0) / steps
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", 0) or getattr(e, "cuda_time_total", 0)
        if us > 0 and e.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((us / steps / 1e3, e.count / steps, e.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    count = sum(r[1] for r in rows)
    print(f"\n[{label}] kernels per step: {count:.0f}, kernel time {total:.2f} ms, wall (profiled) {wall * 1e3:.2f} ms")
    for ms, n, name in rows[:top]:
        print(f"  {ms:8.3f} ms {n:5.0f}x  {name[:110]}")
    return {"count": count, "kernel_ms": total, "wall_ms": wall * 1e3, "top": rows[:40]}


def check_group_norm():
    """The UNet's GroupNorm on this device against nn.GroupNorm(pytorch_compatible=True), fresh random data."""
    from stable_diffusion.norm import GroupNorm

    worst = 0.0
    for shape, dt in [((4, 64, 64, 320), mx.float16), ((3, 16, 16, 1280), mx.bfloat16), ((2, 8, 8, 640), mx.float32), ((2, 32, 32, 960), mx.float16)]:
        gn = GroupNorm(32, shape[-1], eps=1e-5)
        gn.weight = mx.random.normal((shape[-1],)).astype(dt)
        gn.bias = mx.random.normal((shape[-1],)).astype(dt)
        x = (3 * mx.random.normal(shape) + 2).astype(dt)
        for silu in (False, True):
            got = gn(x, silu=silu).astype(mx.float32)
            ref = nn.GroupNorm.__call__(gn, x.astype(mx.float32))
            ref = nn.silu(ref) if silu else ref
            worst = max(worst, (mx.abs(got - ref).max() / mx.abs(ref).max()).item())
    return worst


def main():
    args = parse_args()
    import torch
    import diffusers

    from stable_diffusion import norm

    if args.group_norm == "templated":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from groupnorm_coldstart import make_impl

        norm._cuda_group_norm = make_impl("templated")
    elif args.group_norm == "portable":
        norm.use_cuda_kernels = lambda x, groups: False

    dev = torch_device()
    if dev.type == "cpu":
        mx.set_default_device(mx.cpu)
    cfg_name, cfg = args.config, CONFIGS[args.config]
    latent = (args.size // 8) if args.size else cfg["sample_size"]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    card = torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or platform.machine()
    print(f"card: {card}; mlx {mx.__version__} (default device {mx.default_device()}), torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"config {cfg_name}, {latent * 8}x{latent * 8} (latent {latent}), {args.dtype}, CFG (UNet batch = 2 x images)")
    print("command: python " + " ".join(sys.argv))

    peak, mlx_peak, peak_dtype = matmul_peak(args.dtype, dev)
    print(f"matmul peak ({peak_dtype}): torch {peak / 1e12:.1f} TFLOP/s, mlx {mlx_peak / 1e12:.1f} TFLOP/s")

    t0 = time.perf_counter()
    ref, ours, tdt, mdt = build_models(cfg, args.dtype, dev)
    if args.fuse == "on":
        ours.fuse_projections()
    print(f"built both models with the same random weights in {time.perf_counter() - t0:.1f} s")

    torch_in, mlx_in = make_inputs(cfg_name, cfg, latent, 2, dev, tdt, mdt)
    flops = flops_per_latent(ref, torch_in)
    print(f"{flops / 1e9:.0f} GFLOP per latent (torch flop counter); compute floor {peak / (2 * flops):.0f} im/s")

    # The same function: compare outputs on one CFG pair.
    with torch.inference_mode():
        x, t, ctx, added = torch_in
        want = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample.float().cpu().numpy().transpose(0, 2, 3, 1)
    got = np.array(ours(*mlx_in).astype(mx.float32))
    err = np.abs(got - want).max() / np.abs(want).max()
    print(f"MLX vs diffusers on the same input: max|diff|/max|ref| = {err:.2e}, finite={np.isfinite(got).all()}")

    print(f"GroupNorm(+SiLU) on this device vs nn.GroupNorm in float32: worst max|diff|/max|ref| = {check_group_norm():.1e}")

    modes = {"on": [True], "off": [False], "both": [False, True]}[args.mx_compile]
    fns = {c: (mx.compile(ours) if c else ours) for c in modes}
    tcomp = None
    rows = []
    for b in batches:
        n = 2 * b
        torch_in, mlx_in = make_inputs(cfg_name, cfg, latent, n, dev, tdt, mdt, seed=b)
        row = {"batch": b}
        for c, fn in fns.items():
            t0 = time.perf_counter()
            mx.eval(fn(*mlx_in))
            first = time.perf_counter() - t0
            sec, _ = median_time(lambda: mx.eval(fn(*mlx_in)), args.warmup, args.repeats, lambda: None)
            row["mlx_compiled" if c else "mlx"] = b / sec
            if c:
                row["mlx_compile_first_call_s"] = first
        if args.torch == "on":
            x, t, ctx, added = torch_in
            with torch.inference_mode():
                step = lambda: ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added)  # noqa: E731
                sec, _ = median_time(step, args.warmup, args.repeats, lambda: sync(dev))
                row["torch"] = b / sec
                if args.torch_compile and (not args.torch_compile_batches or str(b) in args.torch_compile_batches.split(",")):
                    if tcomp is None:
                        tcomp = torch.compile(ref, dynamic=False)
                    sync(dev)
                    t0 = time.perf_counter()
                    tcomp(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added)
                    sync(dev)
                    row["torch_compile_s"] = time.perf_counter() - t0
                    step = lambda: tcomp(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added)  # noqa: E731
                    sec, _ = median_time(step, args.warmup, args.repeats, lambda: sync(dev))
                    row["torch_compiled"] = b / sec
        best = max(row.get("mlx", 0), row.get("mlx_compiled", 0))
        row["mlx_best"] = best
        row["pct_peak"] = 100 * best * 2 * flops / peak
        rows.append(row)
        print("  " + json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))
        mx.clear_cache()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    prof = None
    if args.profile:
        torch_in, mlx_in = make_inputs(cfg_name, cfg, latent, 2 * batches[-1], dev, tdt, mdt)
        prof = profile(ours, ref, mlx_in, torch_in, dev)
        print(f"\nper-op-type ms for one step at batch {batches[-1]} (UNet batch {2 * batches[-1]}), each op synchronised:")
        keys = sorted(set(prof[0]) | set(prof[1]), key=lambda k: -prof[0].get(k, 0))
        print(f"| {'op':24s} | {'MLX ms':>8s} | {'torch ms':>8s} |")
        for k in keys:
            print(f"| {k:24s} | {1e3 * prof[0].get(k, 0):8.2f} | {1e3 * prof[1].get(k, 0):8.2f} |")

    traces = {}
    if args.trace and dev.type != "cuda":
        print("--trace needs a CUDA GPU; skipped")
        args.trace = ""
    for b in [int(v) for v in args.trace.split(",") if v]:
        torch_in, mlx_in = make_inputs(cfg_name, cfg, latent, 2 * b, dev, tdt, mdt)
        fn = fns[modes[-1]]
        traces[f"mlx_{b}"] = kernel_trace(f"MLX{' compiled' if modes[-1] else ''}, batch {b}", lambda: mx.eval(fn(*mlx_in)), dev)
        x, t, ctx, added = torch_in
        with torch.inference_mode():
            traces[f"torch_{b}"] = kernel_trace(f"torch eager, batch {b}", lambda: ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added), dev)

    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "peak": peak, "mlx_peak": mlx_peak, "flops_per_latent": flops, "rows": rows, "profile": prof, "traces": traces, "argv": sys.argv}, indent=1))

    # The seed's table, plus the ratio and the share of the measured peak.
    print(f"\n{card}, {cfg_name} {latent * 8}x{latent * 8}, {args.dtype}, CFG; peak {peak / 1e12:.0f} TFLOP/s ({peak_dtype} torch matmul), {flops / 1e9:.0f} GFLOP/latent")
    head = "| Batch size | MLX (im/s) | PyTorch (im/s) | MLX/PyTorch |"
    line = "|---:|---:|---:|---:|"
    if args.torch_compile:
        head += " torch.compile (im/s) | MLX/compile |"
        line += "---:|---:|"
    head += " MLX eager / mx.compile (im/s) | % of peak |"
    line += "---|---:|"
    print(head)
    print(line)
    for r in rows:
        s = f"| {r['batch']} | {r['mlx_best']:.1f} |"
        s += f" {r['torch']:.1f} | {r['mlx_best'] / r['torch']:.2f}x |" if "torch" in r else " - | - |"
        if args.torch_compile:
            s += f" {r['torch_compiled']:.1f} | {r['mlx_best'] / r['torch_compiled']:.2f}x |" if "torch_compiled" in r else " - | - |"
        s += f" {r.get('mlx', float('nan')):.1f} / {r.get('mlx_compiled', float('nan')):.1f} | {r['pct_peak']:.0f}% |"
        print(s)
    if args.torch_compile:
        print("torch.compile time per shape (s): " + ", ".join(f"{r['batch']}: {r.get('torch_compile_s', 0):.0f}" for r in rows))


if __name__ == "__main__":
    main()
