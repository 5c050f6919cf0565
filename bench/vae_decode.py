"""VAE decoder speed and memory: our MLX decoder stage by stage, and diffusers' AutoencoderKL.

    python bench/vae_decode.py [--batch-sizes 1,4] [--size 64] [--torch]

SD's VAE config (block_out_channels 128/256/512/512, random weights). Each stage is evaluated and
timed on its own (median of 3 after a warm-up) so the slow one stands out.
"""

import argparse
import statistics
import time

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stable_diffusion.config import AutoencoderConfig  # noqa: E402
from stable_diffusion.vae import Autoencoder  # noqa: E402

SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32, latent_channels=4)


def timed(fn, repeats=3):
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def stages(decoder, z):
    """(name, thunk) for each stage, each fed the previous stage's (evaluated) output."""
    out = [("conv_in", decoder.conv_in, z)]
    x = decoder.conv_in(z)
    mx.eval(x)
    for name, module in [("mid_block", decoder.mid_block)] + [(f"up_blocks.{i}", b) for i, b in enumerate(decoder.up_blocks)]:
        out.append((name, module, x))
        x = module(x)
        mx.eval(x)
    out.append(("conv_norm_out+silu", lambda h: decoder.conv_norm_out(h, silu=True), x))
    h = decoder.conv_norm_out(x, silu=True)
    mx.eval(h)
    out.append(("conv_out", decoder.conv_out, h))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--size", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--torch", action="store_true", help="also time diffusers' AutoencoderKL.decode")
    args = parser.parse_args()

    vae = Autoencoder(AutoencoderConfig.from_dict(SD_VAE))
    params = vae.parameters()
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(mx, dtype_name)
        vae.set_dtype(dtype)
        mx.eval(vae.parameters())
        for b in map(int, args.batch_sizes.split(",")):
            z = mx.random.normal((b, args.size, args.size, 4)).astype(dtype)
            mx.reset_peak_memory()
            total = timed(lambda: vae.decode(z))
            print(f"MLX decode {dtype_name} batch {b}: {total:.1f} ms, peak {mx.get_peak_memory() / 2**30:.2f} GB", flush=True)
            for name, fn, x in stages(vae.decoder, z):
                mx.reset_peak_memory()
                ms = timed(lambda: fn(x))
                print(f"    {name:20s} {ms:8.1f} ms  peak {mx.get_peak_memory() / 2**30:.2f} GB  in {tuple(x.shape)}", flush=True)
            # Single ops at the largest resolution, to tell conv from norm from upsample.
            x = mx.random.normal((b, args.size * 8, args.size * 8, 128)).astype(dtype)
            conv = nn.Conv2d(128, 128, 3, padding=1)
            conv.set_dtype(dtype)
            conv3 = nn.Conv2d(128, 3, 3, padding=1)
            conv3.set_dtype(dtype)
            norm = vae.decoder.conv_norm_out
            print(f"    op conv3x3 128->128 {timed(lambda: conv(x)):.1f} ms, 128->3 {timed(lambda: conv3(x)):.1f} ms, "
                  f"groupnorm+silu {timed(lambda: norm(x, silu=True)):.1f} ms, copy {timed(lambda: x + 1):.1f} ms", flush=True)
    del params

    if args.torch:
        import torch
        from diffusers import AutoencoderKL

        ref = AutoencoderKL(**SD_VAE, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4).cuda()
        for dtype_name in args.dtypes.split(","):
            ref.to(getattr(torch, dtype_name))
            for b in map(int, args.batch_sizes.split(",")):
                z = torch.randn((b, 4, args.size, args.size), device="cuda", dtype=getattr(torch, dtype_name))
                torch.cuda.reset_peak_memory_stats()
                with torch.no_grad():
                    ref.decode(z)
                    torch.cuda.synchronize()
                    times = []
                    for _ in range(3):
                        start = time.perf_counter()
                        ref.decode(z)
                        torch.cuda.synchronize()
                        times.append(time.perf_counter() - start)
                print(f"diffusers decode {dtype_name} batch {b}: {statistics.median(times) * 1e3:.1f} ms, "
                      f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GB", flush=True)


if __name__ == "__main__":
    main()
