"""GroupNorm (optionally fused with the SiLU that follows it) over NHWC, statistics in float32.

Matches ``torch.nn.GroupNorm`` (as diffusers uses it in the UNet and VAE). On a CUDA GPU it runs as two
small kernels with no transposes; everywhere else as ``nn.GroupNorm(pytorch_compatible=True)``.

The CUDA kernels take every size as a run-time argument and ship precompiled, as PTX text
(``group_norm.ptx``, generated from ``CUDA_SOURCE`` below by ``python -m stable_diffusion.norm``):
the driver turns it into machine code once per machine (0.5-0.7 s on an H100 for all of them) and keeps
the result in its own disk cache (``CUDA_CACHE_PATH``), so a new process spends ~6 ms on GroupNorm whatever
the shapes, where NVRTC took 1.4-3 s per kernel and shape (bench/RESULTS.md, section 8).
"""

import hashlib
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

PTX_PATH = Path(__file__).with_name("group_norm.ptx")
PTX_ARCH = "compute_75"  # the oldest GPU the CUDA 13 toolchain targets; newer ones JIT the PTX up

DEVICE_SOURCE = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace sd_gn {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Chan's combination of two (count, mean, M2) summaries into the first.
__device__ __forceinline__ void combine(float& cnt, float& mean, float& m2, float cb, float mb, float m2b) {
    float tot = cnt + cb;
    if (cb > 0.f) {
        float d = mb - mean;
        mean += d * cb / tot;
        m2 += m2b + d * d * cnt * cb / tot;
        cnt = tot;
    }
}

// One block per (group, batch) = (blockIdx.y, blockIdx.z); x is (B, N, C), a group is C / G
// consecutive channels. Each thread reads whole vectors U (the widest that divides a group's row of
// C / G values), four loads in flight, and sums in fp32; then Chan's combination across the block, so
// no E[x^2] - E[x]^2 cancellation over the whole group.
template <typename T, typename U>
__device__ void stats_vec(const T* x, float* mean_out, float* rstd_out, int N, int C, int G, float eps) {
    constexpr int E = sizeof(U) / sizeof(T);
    const int UR = C / G / E, g = blockIdx.y, b = blockIdx.z, tid = threadIdx.x, nt = blockDim.x;
    const U* base = reinterpret_cast<const U*>(x + (size_t)b * N * C + (size_t)g * (C / G));
    const size_t stride = C / E;
    // Walk the group's N x UR vectors row-major, stepping (n, c) without a division per load.
    int n = tid / UR, c = tid - n * UR;
    const int dn = nt / UR, dc = nt - dn * UR;
    float s = 0.f, ss = 0.f, cnt = 0.f;
    while (n < N) {
        U v[4];
        bool ok[4];
        #pragma unroll
        for (int k = 0; k < 4; ++k) {
            ok[k] = n < N;
            if (ok[k]) v[k] = base[(size_t)n * stride + c];
            n += dn; c += dc;
            if (c >= UR) { c -= UR; n += 1; }
        }
        #pragma unroll
        for (int k = 0; k < 4; ++k) {
            if (!ok[k]) continue;
            const T* e = reinterpret_cast<const T*>(&v[k]);
            #pragma unroll
            for (int j = 0; j < E; ++j) { float f = to_float(e[j]); s += f; ss += f * f; }
            cnt += (float)E;
        }
    }
    float mean = cnt > 0.f ? s / cnt : 0.f;
    float m2 = cnt > 0.f ? ss - s * mean : 0.f;
    for (int off = 16; off > 0; off >>= 1) {
        float cb = __shfl_down_sync(0xffffffff, cnt, off);
        float mb = __shfl_down_sync(0xffffffff, mean, off);
        float m2b = __shfl_down_sync(0xffffffff, m2, off);
        combine(cnt, mean, m2, cb, mb, m2b);
    }
    __shared__ float sc[32], sm[32], sm2[32];
    const int warp = tid / 32, lane = tid % 32;
    if (lane == 0) { sc[warp] = cnt; sm[warp] = mean; sm2[warp] = m2; }
    __syncthreads();
    if (tid == 0) {
        float c0 = sc[0], mu = sm[0], q = sm2[0];
        for (int w = 1; w < nt / 32; ++w) combine(c0, mu, q, sc[w], sm[w], sm2[w]);
        mean_out[b * G + g] = mu;
        rstd_out[b * G + g] = rsqrtf(fmaxf(q / c0, 0.f) + eps);
    }
}

template <typename T>
__device__ void stats(const T* x, float* mean_out, float* rstd_out, int N, int C, int G, float eps) {
    const int row_bytes = C / G * (int)sizeof(T);
    if (row_bytes % 16 == 0) stats_vec<T, uint4>(x, mean_out, rstd_out, N, C, G, eps);
    else if (row_bytes % 8 == 0) stats_vec<T, uint2>(x, mean_out, rstd_out, N, C, G, eps);
    else if (row_bytes % 4 == 0) stats_vec<T, unsigned int>(x, mean_out, rstd_out, N, C, G, eps);
    else stats_vec<T, T>(x, mean_out, rstd_out, N, C, G, eps);
}

// One thread per 16 bytes of x: normalise, scale, shift and (if silu) SiLU, stored as one vector.
// Needs C to be a multiple of 16 / sizeof(T).
template <typename T>
__device__ void apply(const T* x, const float* mean, const float* rstd, const T* weight, const T* bias, T* out,
                      int B, int N, int C, int G, int silu) {
    constexpr int VEC = 16 / sizeof(T);
    const size_t idx = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * VEC, total = (size_t)B * N * C;
    if (idx >= total) return;
    const int CG = C / G;
    int c0, b;
    if (total < (1u << 31)) {  // 32-bit division where it fits: far fewer instructions than 64-bit
        const unsigned row = (unsigned)idx / (unsigned)C;
        c0 = (int)((unsigned)idx - row * (unsigned)C);
        b = (int)(row / (unsigned)N);
    } else {
        const size_t row = idx / C;
        c0 = (int)(idx - row * C);
        b = (int)(row / N);
    }
    int g = c0 / CG, next = (g + 1) * CG;
    uint4 raw = *reinterpret_cast<const uint4*>(x + idx);
    T* vals = reinterpret_cast<T*>(&raw);
    #pragma unroll
    for (int k = 0; k < VEC; ++k) {
        const int c = c0 + k;
        if (c >= next) { g += 1; next += CG; }
        const int bg = b * G + g;
        float v = (to_float(vals[k]) - mean[bg]) * rstd[bg] * to_float(weight[c]) + to_float(bias[c]);
        if (silu) v = v / (1.f + __expf(-v));
        vals[k] = from_float<T>(v);
    }
    *reinterpret_cast<uint4*>(out + idx) = raw;
}

}  // namespace sd_gn
"""

# The entry points, one pair per dtype; arguments in MLX's order: inputs, outputs, scalars.
ENTRY_POINTS = {}
for _name, _t in (("float16", "__half"), ("bfloat16", "__nv_bfloat16"), ("float32", "float")):
    ENTRY_POINTS[f"sd_group_norm_stats_{_name}"] = rf"""
extern "C" __global__ void __launch_bounds__(1024) sd_group_norm_stats_{_name}(
        const {_t}* x, float* mean, float* rstd, int N, int C, int G, int eps_bits) {{
    sd_gn::stats<{_t}>(x, mean, rstd, N, C, G, __int_as_float(eps_bits));
}}
"""
    ENTRY_POINTS[f"sd_group_norm_apply_{_name}"] = rf"""
extern "C" __global__ void sd_group_norm_apply_{_name}(
        const {_t}* x, const float* mean, const float* rstd, const {_t}* weight, const {_t}* bias, {_t}* out,
        int B, int N, int C, int G, int silu) {{
    sd_gn::apply<{_t}>(x, mean, rstd, weight, bias, out, B, N, C, G, silu);
}}
"""
CUDA_SOURCE = DEVICE_SOURCE + "".join(ENTRY_POINTS.values())
_SECTION = "// ==== kernel "


def source_digest() -> str:
    """What the shipped PTX records of the source it was built from (a stale PTX fails a test)."""
    return hashlib.sha256(f"{PTX_ARCH}\n{CUDA_SOURCE}".encode()).hexdigest()


def write_ptx(path: Path = PTX_PATH, nvcc: str = "nvcc") -> None:
    """Compile each entry point of CUDA_SOURCE to its own PTX module (a process loads only those it
    uses) and write them, one section each, under a first line that records the source digest."""
    sections = [f"// sd group_norm source sha256 {source_digest()}\n"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, entry in ENTRY_POINTS.items():
            cu, ptx = Path(tmp) / f"{name}.cu", Path(tmp) / f"{name}.ptx"
            cu.write_text(DEVICE_SOURCE + entry)
            subprocess.run([nvcc, "-ptx", f"-arch={PTX_ARCH}", "-O3", "-o", str(ptx), str(cu)], check=True)
            sections.append(f"{_SECTION}{name}\n" + ptx.read_text())
    path.write_text("".join(sections))


_ptx = {}
STATS_THREADS = 1024  # one block per (batch, group): few blocks, so many threads and loads in flight each


def _float_bits(v: float) -> int:
    return struct.unpack("<i", struct.pack("<f", v))[0]


def _load_ptx(name: str) -> bytes:
    if not _ptx:
        for section in PTX_PATH.read_text().split(_SECTION)[1:]:
            kernel, text = section.split("\n", 1)
            _ptx[kernel] = text.encode()
    return _ptx[name]


def _cuda_group_norm(
    x: mx.array, weight: mx.array, bias: mx.array, groups: int, eps: float, silu: bool, stats_threads: int = STATS_THREADS
) -> mx.array:
    """GroupNorm (+ SiLU) on NHWC without transposes: a statistics kernel, then one fused pass."""
    B, H, W, C = x.shape
    N = H * W
    dtype = str(x.dtype).split(".")[-1]
    stats, apply = f"sd_group_norm_stats_{dtype}", f"sd_group_norm_apply_{dtype}"
    mean, rstd = mx.fast.precompiled_cuda_kernel(
        name=stats,
        compiled_source=_load_ptx(stats),
        inputs=[x],
        output_shapes=[(B, groups), (B, groups)],
        output_dtypes=[mx.float32, mx.float32],
        scalars=[N, C, groups, _float_bits(eps)],  # precompiled_cuda_kernel takes no float scalars
        grid=(stats_threads, groups, B),
        threadgroup=(stats_threads, 1, 1),
        ensure_row_contiguous=True,
    )
    vec = 16 // x.dtype.size
    (out,) = mx.fast.precompiled_cuda_kernel(
        name=apply,
        compiled_source=_load_ptx(apply),
        inputs=[x, mean, rstd, weight.astype(x.dtype), bias.astype(x.dtype)],
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
        scalars=[B, N, C, groups, int(silu)],
        grid=(B * N * C // vec, 1, 1),
        threadgroup=(256, 1, 1),
        ensure_row_contiguous=True,
    )
    return out


class GroupNorm(nn.GroupNorm):
    """PyTorch-style GroupNorm over NHWC, optionally followed by SiLU, statistics in float32.

    On a CUDA GPU it runs as two small precompiled kernels (statistics, then normalise-affine-SiLU in
    one pass); elsewhere ``nn.GroupNorm(pytorch_compatible=True)``, whose grouping costs two transposes.
    """

    def __init__(self, num_groups: int, dims: int, eps: float):
        super().__init__(num_groups, dims, eps=eps, pytorch_compatible=True)

    def __call__(self, x: mx.array, silu: bool = False) -> mx.array:
        if use_cuda_kernels(x, self.num_groups):
            return _cuda_group_norm(x, self.weight, self.bias, self.num_groups, self.eps, silu)
        x = super().__call__(x)
        return nn.silu(x) if silu else x


def use_cuda_kernels(x: mx.array, groups: int) -> bool:
    """The kernels need NHWC, a float dtype, 16-byte channel rows and whole groups."""
    return (
        on_cuda()
        and x.ndim == 4
        and x.dtype in (mx.float16, mx.bfloat16, mx.float32)
        and x.shape[-1] % 8 == 0
        and x.shape[-1] % groups == 0
    )


def on_cuda() -> bool:
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


if __name__ == "__main__":
    write_ptx(Path(sys.argv[1]) if len(sys.argv) > 1 else PTX_PATH)
    print(f"wrote {PTX_PATH if len(sys.argv) < 2 else sys.argv[1]}")
