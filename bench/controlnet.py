"""What a ControlNet and inpainting add to a denoising step and to an image, against diffusers.

Random weights of the real configs (``bench/_models.py``: SD 1.5 and SDXL base, float16 safetensors in
diffusers' layout), and a ControlNet built from each UNet as diffusers' ``ControlNetModel.from_unet``
builds one (the layout of lllyasviel/control_v11p_sd15_canny and diffusers/controlnet-canny-sdxl-1.0:
the UNet's encoder and mid block, the hint convs, one 1x1 conv per skip), its zero-initialised convs
given random values so that the residuals are not zeros. Both libraries load the same files, in one
process, on one GPU.

1. ``steps``: one denoising step with classifier-free guidance (batch 2) at the model's native size:
   the UNet alone, the ControlNet alone, and ControlNet + UNet (the residuals added to the UNet's
   skips and mid block), ours against diffusers' ``UNet2DConditionModel`` / ``ControlNetModel``;
   median ms, peak memory (``mx.get_peak_memory`` / ``torch.cuda.max_memory_allocated``, every
   weight of the pipeline resident), and how far ours is from diffusers on the same inputs. Ours
   runs the ControlNet as ``load_controlnet`` returns it; ``steps_controlnet_fused`` (measured last)
   repeats ours with its projections fused (``fuse_projections``), as the pipeline runs it (its
   ``ControlRun`` fuses a ControlNet at its first generation).
2. ``inpaint`` (SD 1.5): a 9-channel inpainting UNet's step (latents, mask and masked-image latents
   concatenated, ``inpaint.Inpainting.unet_input``) against the plain UNet's, and the 4-channel
   loop's per-step blend of the known region (``inpaint.blend_known``: the image latents re-noised
   to the next timestep) against the same lines of ``StableDiffusionInpaintPipeline``.
3. ``pipeline``: one whole image (20 Euler steps, CFG 7.5, text encoding, VAE decode to host
   pixels) with one canny ControlNet and without, against StableDiffusion(XL)ControlNetPipeline and
   StableDiffusion(XL)Pipeline (``from_pipe``: the same modules). Needs ``generate_latents(...,
   controls=...)``; skipped, with a line saying so, where the package has none yet.

    python bench/controlnet.py --models /tmp/cn --json $OUT/controlnet.json    # GPU, carrying bench/_tokenizer
    python bench/controlnet.py --models /tmp/cn_tiny --tiny                    # CPU smoke test (toy widths, float32)
"""

import argparse
import datetime
import inspect
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import _models
import mlx.core as mx
import numpy as np
from PIL import Image, ImageDraw

from stable_diffusion import canny, inpaint
from stable_diffusion.config import UNetConfig
from stable_diffusion.controlnet import Control, load_controlnet
from stable_diffusion.pipeline import load_model
from stable_diffusion.sampler_names import make_sampler
from stable_diffusion.unet import UNetModel

PROMPT = "a photograph of an astronaut riding a horse"
STEPS = 20
CFG = 7.5
PIPELINES = {  # family: (with a ControlNet, without)
    "sd15": ("StableDiffusionControlNetPipeline", "StableDiffusionPipeline"),
    "sdxl": ("StableDiffusionXLControlNetPipeline", "StableDiffusionXLPipeline"),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="/tmp/bench_controlnet", help="folder for the random models (written when missing)")
    p.add_argument("--tokenizer", default=str(ROOT / "bench" / "_tokenizer"), help="bench/generate.py --write-tokenizer folder")
    p.add_argument("--families", default="sd15,sdxl")
    p.add_argument("--parts", default="steps,inpaint,pipeline", help="any of steps, inpaint (SD 1.5 only), pipeline")
    p.add_argument("--tiny", action="store_true", help="toy-width models in float32 (CPU smoke test)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per measurement")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per measurement (median)")
    p.add_argument("--image-repeats", type=int, default=3, help="timed whole images per pipeline (median), after one untimed")
    p.add_argument("--json", default=None, help="write every number here (rewritten after each row)")
    return p.parse_args()


# ---- timing ------------------------------------------------------------------------------------


class Torch:
    """The torch device, dtype and synchronisation of this run."""

    def __init__(self, tiny: bool):
        import torch

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.dev = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.float32 if tiny else torch.float16

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gb(self):
        return self.torch.cuda.max_memory_allocated() / 1e9 if self.cuda else None

    def active_gb(self):
        return self.torch.cuda.memory_allocated() / 1e9 if self.cuda else None


def median_ms(fn, sync, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measured(fn, sync, reset_peak, peak_gb, warmup: int, repeats: int) -> dict:
    """Median ms of ``fn`` and the peak memory over its timed runs."""
    fn()  # a first call outside the peak: compilation, lazy loading
    sync()
    reset_peak()
    ms = median_ms(fn, sync, warmup, repeats)
    return {"ms": ms, "peak_gb": peak_gb()}


def mlx_peak_gb():
    return mx.get_peak_memory() / 1e9


def mlx_sync():
    mx.synchronize()


# ---- models ------------------------------------------------------------------------------------


def family_folders(root: Path, family: str) -> tuple[Path, Path]:
    return root / family, root / f"{family}-canny"


def make_models(root: Path, tokenizers: Path, family: str, tiny: bool, th: Torch) -> tuple[Path, Path]:
    """The family's random pipeline folder and a ControlNet folder built from its UNet (written once)."""
    folder, cn_folder = family_folders(root, family)
    if not (folder / "model_index.json").exists():
        t0 = time.perf_counter()
        _models.make_model(folder, tokenizers, family, tiny)
        print(f"# wrote {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    if not (cn_folder / "config.json").exists():
        from diffusers import ControlNetModel, UNet2DConditionModel

        t0 = time.perf_counter()
        th.torch.manual_seed(1)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet").to(th.dev)
        cn = ControlNetModel.from_unet(unet)  # the UNet's encoder weights, the extra convs zero
        for conv in [*cn.controlnet_down_blocks, cn.controlnet_mid_block, cn.controlnet_cond_embedding.conv_out]:
            conv.reset_parameters()  # PyTorch's default init: residuals that are not zeros
        cn.to(th.torch.float16).save_pretrained(cn_folder, safe_serialization=True)
        del unet, cn
        if th.cuda:
            th.torch.cuda.empty_cache()
        print(f"# wrote {cn_folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder, cn_folder


def control_picture(size: int) -> Image.Image:
    """A canny edge map (RGB, 0/255) of a drawn scene, as A1111's canny preprocessor gives it."""
    picture = Image.new("RGB", (size, size), (40, 90, 160))
    draw = ImageDraw.Draw(picture)
    s = size / 512
    draw.ellipse([100 * s, 80 * s, 300 * s, 280 * s], fill=(230, 200, 40))
    draw.rectangle([260 * s, 250 * s, 470 * s, 470 * s], fill=(180, 40, 40))
    draw.polygon([(30 * s, 480 * s), (200 * s, 300 * s), (350 * s, 490 * s)], fill=(30, 160, 60))
    edges = canny.canny(np.array(picture), 100, 200)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


def step_inputs(config: dict, side: int, th: Torch, mdtype, seed: int = 0):
    """Batch-2 (CFG) step inputs: NCHW torch tensors and the same values NHWC in MLX."""
    rng = np.random.default_rng(seed)
    latent = side // 8
    x = rng.standard_normal((2, 4, latent, latent), dtype=np.float32)
    t = np.full((2,), 500.0, dtype=np.float32)
    ctx = rng.standard_normal((2, 77, config["cross_attention_dim"]), dtype=np.float32)
    tt = lambda a: th.torch.from_numpy(a).to(th.dev, th.dtype)
    ours = {"x": mx.array(x.transpose(0, 2, 3, 1)).astype(mdtype), "t": mx.array(t), "ctx": mx.array(ctx).astype(mdtype), "text_time": None}
    theirs = {"x": tt(x), "t": th.torch.from_numpy(t).to(th.dev), "ctx": tt(ctx), "added": None}
    if config.get("addition_embed_type") == "text_time":
        pooled = rng.standard_normal((2, config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]), dtype=np.float32)
        ids = np.tile(np.array([[side, side, 0, 0, side, side]], dtype=np.float32), (2, 1))
        ours["text_time"] = (mx.array(pooled).astype(mdtype), mx.array(ids).astype(mdtype))
        theirs["added"] = {"text_embeds": tt(pooled), "time_ids": tt(ids)}
    return ours, theirs


def relative_error(ours: mx.array, theirs) -> float:
    """max |ours - diffusers| / max |diffusers|, ours NHWC against diffusers' NCHW."""
    a = np.array(ours.astype(mx.float32)).transpose(0, 3, 1, 2)
    b = theirs.float().cpu().numpy()
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# ---- 1. steps ----------------------------------------------------------------------------------


def step_functions(sd, cn, pipe_cn, picture, th, mdtype) -> tuple[dict, dict]:
    """One guided step's calls, ours and diffusers', on the same inputs: UNet, ControlNet, both."""
    torch = th.torch
    ours, theirs = step_inputs(_unet_config(sd), picture.size[0], th, mdtype)
    hint = np.asarray(picture, dtype=np.float32)[None] / 255
    # The pipelines prepare the control image once, repeated over the guidance halves.
    hint_ours = mx.array(np.concatenate([hint] * 2)).astype(mdtype)
    hint_theirs = torch.from_numpy(np.concatenate([hint] * 2).transpose(0, 3, 1, 2).copy()).to(th.dev, th.dtype)
    unet, x, t, ctx, text_time = sd.unet, ours["x"], ours["t"], ours["ctx"], ours["text_time"]

    def our_both():
        down, mid = cn(x, t, ctx, hint_ours, 1.0, text_time)
        return unet(x, t, ctx, text_time, down, mid)

    tu, tc = pipe_cn.unet, pipe_cn.controlnet
    tx, tt_, tctx, added = theirs["x"], theirs["t"], theirs["ctx"], theirs["added"]

    def their_cn():
        return tc(tx, tt_, encoder_hidden_states=tctx, controlnet_cond=hint_theirs, conditioning_scale=1.0, added_cond_kwargs=added, return_dict=False)

    def their_both():
        down, mid = their_cn()
        return tu(tx, tt_, encoder_hidden_states=tctx, added_cond_kwargs=added, down_block_additional_residuals=down,
                  mid_block_additional_residual=mid, return_dict=False)[0]

    mlx_fns = {
        "unet": lambda: unet(x, t, ctx, text_time),
        "controlnet": lambda: cn(x, t, ctx, hint_ours, 1.0, text_time),
        "unet_controlnet": our_both,
    }
    torch_fns = {
        "unet": lambda: tu(tx, tt_, encoder_hidden_states=tctx, added_cond_kwargs=added, return_dict=False)[0],
        "controlnet": their_cn,
        "unet_controlnet": their_both,
    }
    return mlx_fns, torch_fns


def time_mlx(fns: dict, args) -> dict:
    return {f"mlx_{name}": measured(lambda fn=fn: mx.eval(fn()), mlx_sync, mx.reset_peak_memory, mlx_peak_gb, args.warmup, args.repeats) for name, fn in fns.items()}


def bench_steps(family, sd, cn, pipe_cn, picture, args, th, mdtype) -> dict:
    """The step with and without the ControlNet, as the pipeline runs it (its ControlNet unfused)."""
    mlx_fns, torch_fns = step_functions(sd, cn, pipe_cn, picture, th, mdtype)
    row = {"family": family, "part": "steps", "size": picture.size[0], "batch": 2}
    with th.torch.inference_mode():
        row["error_unet"] = relative_error(mlx_fns["unet"](), torch_fns["unet"]())
        row["error_unet_controlnet"] = relative_error(mlx_fns["unet_controlnet"](), torch_fns["unet_controlnet"]())
        row["mlx_weights_gb"] = mx.get_active_memory() / 1e9
        row["torch_weights_gb"] = th.active_gb()
        row.update(time_mlx(mlx_fns, args))
        for name, fn in torch_fns.items():
            row[f"torch_{name}"] = measured(fn, th.sync, th.reset_peak, th.peak_gb, args.warmup, args.repeats)
    for lib in ("mlx", "torch"):
        added_ms = row[f"{lib}_unet_controlnet"]["ms"] - row[f"{lib}_unet"]["ms"]
        row[f"{lib}_controlnet_added_ms"] = added_ms
        row[f"{lib}_controlnet_added_pct"] = 100 * added_ms / row[f"{lib}_unet"]["ms"]
    for name in mlx_fns:
        row[f"ratio_{name}"] = row[f"mlx_{name}"]["ms"] / row[f"torch_{name}"]["ms"]  # ours/diffusers: < 1 is faster
    row["controlnet_params_m"] = sum(p.numel() for p in pipe_cn.controlnet.parameters()) / 1e6
    row["unet_params_m"] = sum(p.numel() for p in pipe_cn.unet.parameters()) / 1e6
    return row


def bench_fused(family, sd, cn, pipe_cn, picture, args, th, mdtype) -> dict:
    """The same steps with the ControlNet's projections fused as the UNet's are (fuse_projections),
    as the pipeline runs it; a no-op when a generation has fused it already."""
    cn.fuse_projections()
    mlx_fns, torch_fns = step_functions(sd, cn, pipe_cn, picture, th, mdtype)
    row = {"family": family, "part": "steps_controlnet_fused", "size": picture.size[0], "batch": 2}
    with th.torch.inference_mode():
        row["error_unet_controlnet"] = relative_error(mlx_fns["unet_controlnet"](), torch_fns["unet_controlnet"]())
    row.update(time_mlx(mlx_fns, args))
    row["mlx_controlnet_added_ms"] = row["mlx_unet_controlnet"]["ms"] - row["mlx_unet"]["ms"]
    row["mlx_controlnet_added_pct"] = 100 * row["mlx_controlnet_added_ms"] / row["mlx_unet"]["ms"]
    return row


def _unet_config(sd) -> dict:
    """The folder's unet/config.json (what diffusers built its UNet from)."""
    return json.loads((Path(sd.root) / "unet" / "config.json").read_text())


# ---- 2. inpainting -----------------------------------------------------------------------------


def bench_inpaint(sd, pipe, side: int, args, th, mdtype) -> dict:
    """A 9-channel UNet's step against the plain UNet's, and the 4-channel blend, both libraries."""
    torch = th.torch
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    config = _unet_config(sd)
    ours, theirs = step_inputs(config, side, th, mdtype)
    # The inpainting UNet (runwayml/stable-diffusion-inpainting's layout): 9 input channels.
    config9 = {k: v for k, v in config.items() if not k.startswith("_")} | {"in_channels": 9}
    torch.manual_seed(2)
    with torch.device(th.dev):
        ref9 = UNet2DConditionModel(**config9)
    ref9 = ref9.to(th.dtype).eval()
    unet9 = UNetModel(UNetConfig.from_dict(config9))
    weights = {k: mx.array(v.float().cpu().numpy()).astype(mdtype) for k, v in ref9.state_dict().items()}
    unet9.load_weights(list(unet9.sanitize(weights).items()), strict=True)
    del weights
    unet9.fuse_projections()  # as the pipeline runs its UNet
    mx.eval(unet9.parameters())

    latent = side // 8
    rng = np.random.default_rng(3)
    mask = (rng.random((1, latent, latent, 1)) > 0.5).astype(np.float32)
    masked = rng.standard_normal((1, latent, latent, 4), dtype=np.float32)
    inpainting = inpaint.Inpainting(mask, masked_latents=mx.array(masked).astype(mdtype))
    x, t, ctx = ours["x"], ours["t"], ours["ctx"]
    # diffusers' loop: mask and masked latents prepared once for both guidance halves, concatenated each step.
    t_mask = torch.from_numpy(np.concatenate([mask] * 2).transpose(0, 3, 1, 2).copy()).to(th.dev, th.dtype)
    t_masked = torch.from_numpy(np.concatenate([masked] * 2).transpose(0, 3, 1, 2).copy()).to(th.dev, th.dtype)
    tx, tt_, tctx = theirs["x"], theirs["t"], theirs["ctx"]
    row = {"family": "sd15", "part": "inpaint", "size": side, "batch": 2}
    with torch.inference_mode():
        row["error_unet9"] = relative_error(
            unet9(inpainting.unet_input(x), t, ctx), ref9(torch.cat([tx, t_mask, t_masked], dim=1), tt_, encoder_hidden_states=tctx).sample
        )
        row["mlx_unet"] = measured(lambda: mx.eval(sd.unet(x, t, ctx)), mlx_sync, mx.reset_peak_memory, mlx_peak_gb, args.warmup, args.repeats)
        row["mlx_unet9"] = measured(lambda: mx.eval(unet9(inpainting.unet_input(x), t, ctx)), mlx_sync, mx.reset_peak_memory, mlx_peak_gb, args.warmup, args.repeats)
        row["torch_unet"] = measured(lambda: pipe.unet(tx, tt_, encoder_hidden_states=tctx).sample, th.sync, th.reset_peak, th.peak_gb, args.warmup, args.repeats)
        row["torch_unet9"] = measured(
            lambda: ref9(torch.cat([tx, t_mask, t_masked], dim=1), tt_, encoder_hidden_states=tctx).sample, th.sync, th.reset_peak, th.peak_gb, args.warmup, args.repeats
        )
    for lib in ("mlx", "torch"):
        row[f"{lib}_unet9_added_ms"] = row[f"{lib}_unet9"]["ms"] - row[f"{lib}_unet"]["ms"]
        row[f"{lib}_unet9_added_pct"] = 100 * row[f"{lib}_unet9_added_ms"] / row[f"{lib}_unet"]["ms"]
    row["ratio_unet9"] = row["mlx_unet9"]["ms"] / row["torch_unet9"]["ms"]

    # The 4-channel loop, after each step: the known region reset to the image latents re-noised
    # to the next timestep. One image (the loop blends after guidance); the latents are float32.
    sampler = make_sampler(None, sd.scheduler_config)
    sampler.set_timesteps(STEPS)
    x1 = mx.array(rng.standard_normal((1, latent, latent, 4), dtype=np.float32))
    image_latents = mx.array(rng.standard_normal((1, latent, latent, 4), dtype=np.float32))
    noise = mx.array(rng.standard_normal((1, latent, latent, 4), dtype=np.float32))
    mask_mx = mx.array(mask)
    mx.eval(x1, image_latents, noise, mask_mx)
    i = STEPS // 2
    row["mlx_blend_ms"] = median_ms(lambda: mx.eval(inpaint.blend_known(x1, image_latents, noise, mask_mx, sampler, i)), mlx_sync, args.warmup, 50)

    scheduler = EulerDiscreteScheduler.from_config(sd.scheduler_config)
    scheduler.set_timesteps(STEPS, device=th.dev)
    as_t = lambda a: torch.from_numpy(np.array(a).transpose(0, 3, 1, 2).copy()).to(th.dev, torch.float32)
    lat, img, nz, m = as_t(x1), as_t(image_latents), as_t(noise), as_t(mask_mx)
    noise_timestep = scheduler.timesteps[i + 1]

    def their_blend():
        # StableDiffusionInpaintPipeline.__call__, num_channels_unet == 4 (the mask in the latents' dtype)
        known = scheduler.add_noise(img, nz, torch.tensor([noise_timestep]))
        return (1 - m) * known + m * lat

    row["torch_blend_ms"] = median_ms(their_blend, th.sync, args.warmup, 50)
    row["mlx_blend_pct_of_step"] = 100 * row["mlx_blend_ms"] / row["mlx_unet"]["ms"]
    row["torch_blend_pct_of_step"] = 100 * row["torch_blend_ms"] / row["torch_unet"]["ms"]
    return row


# ---- 3. whole images ---------------------------------------------------------------------------


def has_controls() -> bool:
    from stable_diffusion.pipeline import StableDiffusion

    return "controls" in inspect.signature(StableDiffusion.generate_latents).parameters


def bench_pipeline(family, sd, cn, pipe_cn, picture, args, th) -> dict:
    import diffusers

    torch = th.torch
    side = picture.size[0]
    latent = side // 8
    # from_pipe casts the shared modules to its torch_dtype, float32 unless given
    pipe = getattr(diffusers, PIPELINES[family][1]).from_pipe(pipe_cn, torch_dtype=th.dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe_cn.set_progress_bar_config(disable=True)

    def ours(controls):
        def run():
            extra = {"controls": controls} if controls else {}
            x = None
            for x in sd.generate_latents(PROMPT, num_steps=STEPS, cfg_weight=CFG, latent_size=(latent, latent), seed=0, **extra):
                pass
            return np.array(sd.decode(x))

        return run

    def theirs(with_control):
        def run():
            g = torch.Generator(th.dev).manual_seed(0)
            kwargs = {"num_inference_steps": STEPS, "guidance_scale": CFG, "height": side, "width": side, "generator": g, "output_type": "np"}
            return (pipe_cn(PROMPT, image=picture, **kwargs) if with_control else pipe(PROMPT, **kwargs)).images

        return run

    row = {"family": family, "part": "pipeline", "size": side, "steps": STEPS, "cfg": CFG}
    runs = {
        "mlx_plain": (ours(None), mlx_sync, mx.reset_peak_memory, mlx_peak_gb),
        "mlx_controlnet": (ours([Control(cn, picture, 1.0)]), mlx_sync, mx.reset_peak_memory, mlx_peak_gb),
        "torch_plain": (theirs(False), th.sync, th.reset_peak, th.peak_gb),
        "torch_controlnet": (theirs(True), th.sync, th.reset_peak, th.peak_gb),
    }
    with torch.inference_mode():
        for name, (fn, sync, reset, peak) in runs.items():
            images = []
            r = measured(lambda fn=fn, images=images: images.append(fn()), sync, reset, peak, 0, args.image_repeats)
            r["s"] = r.pop("ms") / 1e3
            r["image_mean"] = float(np.mean(images[-1]))  # a finite picture came out
            row[name] = r
    for lib in ("mlx", "torch"):
        added = row[f"{lib}_controlnet"]["s"] - row[f"{lib}_plain"]["s"]
        row[f"{lib}_controlnet_added_ms_per_step"] = 1e3 * added / STEPS
        row[f"{lib}_controlnet_added_pct"] = 100 * added / row[f"{lib}_plain"]["s"]
    row["ratio_plain"] = row["mlx_plain"]["s"] / row["torch_plain"]["s"]
    row["ratio_controlnet"] = row["mlx_controlnet"]["s"] / row["torch_controlnet"]["s"]
    return row


# ---- main --------------------------------------------------------------------------------------


def main():
    args = parse_args()
    th = Torch(args.tiny)
    import diffusers
    import torch
    from diffusers import ControlNetModel

    mdtype = mx.float32 if args.tiny else mx.float16
    parts = set(args.parts.split(","))
    card = torch.cuda.get_device_name() if th.cuda else f"CPU ({platform.machine()})"
    out = {
        "card": card,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"mlx": mx.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__},
        "mlx_device": str(mx.default_device()),
        "command": "python " + " ".join(sys.argv),
        "rows": [],
    }
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}), flush=True)

    def emit(row):
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))

    if "pipeline" in parts and not has_controls():
        emit({"part": "pipeline", "skipped": "generate_latents has no controls= argument in this checkout"})
        parts.discard("pipeline")

    root = Path(args.models)
    for family in args.families.split(","):
        spec = _models.FAMILIES[family]
        side = spec["tiny_size"] if args.tiny else spec["size"]
        folder, cn_folder = make_models(root, Path(args.tokenizer), family, args.tiny, th)
        picture = control_picture(side)

        t0 = time.perf_counter()
        sd = load_model(str(folder), float16=not args.tiny)
        sd.ensure_models_are_loaded()
        cn = load_controlnet(str(cn_folder), float16=not args.tiny)
        mx.eval(cn.parameters())
        load_mlx = time.perf_counter() - t0
        t0 = time.perf_counter()
        extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
        tcn = ControlNetModel.from_pretrained(cn_folder, torch_dtype=th.dtype)
        pipe_cn = getattr(diffusers, PIPELINES[family][0]).from_pretrained(folder, controlnet=tcn, torch_dtype=th.dtype, **extra).to(th.dev)
        load_torch = time.perf_counter() - t0
        print(f"# {family}: loaded in {load_mlx:.1f} s (MLX), {load_torch:.1f} s (diffusers)", flush=True)

        if "steps" in parts:
            emit(bench_steps(family, sd, cn, pipe_cn, picture, args, th, mdtype))
        if "inpaint" in parts and family == "sd15":
            emit(bench_inpaint(sd, pipe_cn, side, args, th, mdtype))
        if "pipeline" in parts:
            emit(bench_pipeline(family, sd, cn, pipe_cn, picture, args, th))
        if "steps" in parts:  # last: it changes the ControlNet the pipeline runs
            emit(bench_fused(family, sd, cn, pipe_cn, picture, args, th, mdtype))
        del sd, cn, tcn, pipe_cn
        mx.clear_cache()
        if th.cuda:
            torch.cuda.empty_cache()
    print_tables(out)


def print_tables(out: dict):
    """The RESULTS.md tables of this run."""
    print(f"\n{out['card']}, {out['date']}, {out['versions']}\n{out['command']}\n")
    rows = [r for r in out["rows"] if r.get("part") == "steps"]
    if rows:
        print("| model | | UNet step | ControlNet | ControlNet + UNet | added by the ControlNet | peak GB (UNet / + CN) |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in rows:
            for lib, label in (("mlx", "ours (MLX)"), ("torch", "diffusers")):
                print(f"| {r['family']} {r['size']}² | {label} | {r[f'{lib}_unet']['ms']:.1f} ms | {r[f'{lib}_controlnet']['ms']:.1f} ms | "
                      f"{r[f'{lib}_unet_controlnet']['ms']:.1f} ms | {r[f'{lib}_controlnet_added_ms']:.1f} ms ({r[f'{lib}_controlnet_added_pct']:.0f} %) | "
                      f"{_gb(r[f'{lib}_unet']['peak_gb'])} / {_gb(r[f'{lib}_unet_controlnet']['peak_gb'])} |")
            print(f"| | ours/diffusers | {r['ratio_unet']:.2f}x | {r['ratio_controlnet']:.2f}x | {r['ratio_unet_controlnet']:.2f}x | | |")
            print(f"# {r['family']}: max rel. difference from diffusers: UNet {r['error_unet']:.1e}, CN + UNet {r['error_unet_controlnet']:.1e}; "
                  f"params: UNet {r['unet_params_m']:.0f} M, ControlNet {r['controlnet_params_m']:.0f} M")
    for r in out["rows"]:
        if r.get("part") == "steps_controlnet_fused":
            print(f"# {r['family']}, ControlNet projections fused: CN {r['mlx_controlnet']['ms']:.1f} ms, CN + UNet {r['mlx_unet_controlnet']['ms']:.1f} ms, "
                  f"added {r['mlx_controlnet_added_ms']:.1f} ms ({r['mlx_controlnet_added_pct']:.0f} %); error {r['error_unet_controlnet']:.1e}")
    for r in out["rows"]:
        if r.get("part") == "inpaint":
            print(f"\ninpaint {r['size']}²: 9-channel UNet {r['mlx_unet9']['ms']:.1f} ms vs {r['mlx_unet']['ms']:.1f} (MLX, +{r['mlx_unet9_added_pct']:.1f} %), "
                  f"{r['torch_unet9']['ms']:.1f} vs {r['torch_unet']['ms']:.1f} (diffusers, +{r['torch_unet9_added_pct']:.1f} %); ratio {r['ratio_unet9']:.2f}x; "
                  f"error {r['error_unet9']:.1e}; 4-channel blend {r['mlx_blend_ms']:.3f} ms ({r['mlx_blend_pct_of_step']:.2f} % of a step) vs "
                  f"{r['torch_blend_ms']:.3f} ms ({r['torch_blend_pct_of_step']:.2f} %)")
    rows = [r for r in out["rows"] if r.get("part") == "pipeline" and "skipped" not in r]
    if rows:
        print("\n| model | | plain (s) | + canny ControlNet (s) | added per step | peak GB (plain / + CN) |")
        print("|---|---|---:|---:|---:|---:|")
        for r in rows:
            for lib, label in (("mlx", "ours (MLX)"), ("torch", "diffusers")):
                print(f"| {r['family']} {r['size']}² | {label} | {r[f'{lib}_plain']['s']:.2f} | {r[f'{lib}_controlnet']['s']:.2f} | "
                      f"{r[f'{lib}_controlnet_added_ms_per_step']:.1f} ms ({r[f'{lib}_controlnet_added_pct']:.0f} %) | "
                      f"{_gb(r[f'{lib}_plain']['peak_gb'])} / {_gb(r[f'{lib}_controlnet']['peak_gb'])} |")
            print(f"| | ours/diffusers | {r['ratio_plain']:.2f}x | {r['ratio_controlnet']:.2f}x | | |")


def _gb(v):
    return "-" if v is None else f"{v:.2f}"


if __name__ == "__main__":
    main()
