"""Time to the first image in a new process, split by stage: our MLX pipeline against diffusers (eager).

Both load the same files: the random SD 2.1-base-shaped model of ``bench/generate.py`` (float16
safetensors, diffusers layout, real CLIP BPE tokenizer), 1 image, 512x512, 50 steps, CFG 7.5, Euler.
Each implementation runs in two fresh processes one after the other. Before the first, the kernel
caches are empty: MLX's cache of the kernels it generates (``MLX_PTX_CACHE_DIR``) and the driver's
cache of what it JIT-compiles from PTX (``CUDA_CACHE_PATH``), each pointed at a new folder, and the
OS page cache is dropped where allowed. So process 1 is a fresh machine, process 2 the next run.
Stages (wall clock, synchronised):

    imports       interpreter start -> the library and the pipeline class imported
    load          pipeline built, every weight on the device
    first step    text encoding + the first denoising step (compilation of the UNet's kernels lands here)
    other steps   the remaining 49 steps
    decode        VAE decode of the latent to a host image (compilation of the VAE's kernels lands here)

Then, in the same (now warm) process: a new batch size (4 images: UNet batch 8) and a new resolution
(768x768, 1 image), each as the extra time of its first step over its next steps, and of its first
decode over its second.

    python bench/coldstart.py --make-model /tmp/sd21 --tokenizer bench/_tokenizer
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
PROMPT = "a photograph of an astronaut riding a horse"
STAGES = ["imports", "load", "first step", "other steps", "decode"]


def child_mlx(model, t0):
    sys.path.insert(0, str(ROOT))
    import mlx.core as mx
    import numpy as np

    from stable_diffusion.pipeline import StableDiffusion

    marks = {"imports": time.time() - t0}

    def lap(name, start):
        marks[name] = time.time() - start
        return time.time()

    t = time.time()
    sd = StableDiffusion(model, float16=True)
    sd.ensure_models_are_loaded()
    t = lap("load", t)

    def steps(n, latent, count):
        """Times of the first `count` steps (each evaluated), and the last latent."""
        times, x = [], None
        start = time.time()
        gen = sd.generate_latents(PROMPT, n_images=n, num_steps=50, cfg_weight=7.5, latent_size=(latent, latent), seed=0)
        for i, x in enumerate(gen):
            mx.eval(x)
            times.append(time.time() - start)
            start = time.time()
            if i + 1 == count:
                break
        return times, x

    def decode(x):
        return (np.array(sd.decode(x)) * 255).round().astype(np.uint8)

    times, x = steps(1, 64, 50)
    marks["first step"], marks["other steps"] = times[0], sum(times[1:])
    t = time.time()
    decode(x)
    lap("decode", t)
    marks["total"] = time.time() - t0
    return marks, lambda n, latent: _extras(steps, decode, n, latent)


def child_diffusers(model, t0):
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    marks = {"imports": time.time() - t0}
    t = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float16, safety_checker=None, requires_safety_checker=False).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    torch.cuda.synchronize()
    marks["load"] = time.time() - t

    def steps(n, latent, count):
        times, state = [], {"start": time.time()}

        def on_step(p, i, timestep, kwargs):
            torch.cuda.synchronize()
            times.append(time.time() - state["start"])
            state["start"] = time.time()
            if i + 1 == count:
                p._interrupt = True
            return kwargs

        g = torch.Generator("cuda").manual_seed(0)
        out = pipe(PROMPT, num_images_per_prompt=n, num_inference_steps=50, guidance_scale=7.5, height=8 * latent, width=8 * latent,
                   generator=g, output_type="latent", callback_on_step_end=on_step)
        return times, out.images

    def decode(latents):
        with torch.no_grad():
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type="np")
        return (image * 255).round().astype(np.uint8)

    times, x = steps(1, 64, 50)
    marks["first step"], marks["other steps"] = times[0], sum(times[1:])
    t = time.time()
    decode(x)
    marks["decode"] = time.time() - t
    marks["total"] = time.time() - t0
    return marks, lambda n, latent: _extras(steps, decode, n, latent)


def _extras(steps, decode, n, latent):
    """Extra seconds of the first step and the first decode of a new shape, over the next ones."""
    times, x = steps(n, latent, 6)
    t = time.time()
    decode(x)
    first_decode = time.time() - t
    t = time.time()
    decode(x)
    second_decode = time.time() - t
    step = statistics.median(times[2:])
    return {"first_step_s": times[0], "step_s": step, "extra_step_s": times[0] - step,
            "first_decode_s": first_decode, "decode_s": second_decode, "extra_decode_s": first_decode - second_decode}


def run_child(args):
    marks, extras = (child_mlx if args.child == "mlx" else child_diffusers)(args.model, args.t0)
    result = {"stages": marks, "new_batch_4": extras(4, 64), "new_size_768": extras(1, 96)}
    print("RESULT " + json.dumps(result), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--make-model", default=None, help="write the random SD 2.1-base model here (skipped when it exists)")
    p.add_argument("--model", default=None, help="an existing diffusers-format model folder")
    p.add_argument("--tokenizer", default=str(ROOT / "bench" / "_tokenizer"), help="tokenizer folder for --make-model")
    p.add_argument("--impl", default="mlx,diffusers")
    p.add_argument("--json", default=None, help="write all numbers here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_child(args)
        return
    if args.make_model:
        import generate

        if not (Path(args.make_model) / "model_index.json").exists():
            generate.make_model(Path(args.make_model), Path(args.tokenizer), tiny=False)
        args.model = args.make_model
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"card: {card}; command: python {' '.join(sys.argv)}", flush=True)
    results = {}
    for impl in args.impl.split(","):
        caches = Path(tempfile.mkdtemp(prefix=f"coldstart_{impl}_"))
        env = dict(os.environ, MLX_PTX_CACHE_DIR=str(caches / "mlx"), CUDA_CACHE_PATH=str(caches / "nv"))
        for proc in (1, 2):
            if proc == 1:
                subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, stderr=subprocess.DEVNULL)
            t0 = time.time()
            r = subprocess.run([sys.executable, __file__, "--child", impl, "--model", args.model, "--t0", repr(t0)], capture_output=True, text=True, env=env)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
            if r.returncode or not lines:
                print(f"{impl} process {proc} failed ({r.returncode}):\n{r.stderr[-3000:]}", flush=True)
                break
            results[f"{impl} p{proc}"] = json.loads(lines[-1][7:])
            print(f"{impl} process {proc}: {lines[-1][7:]}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"card": card, "argv": sys.argv, "results": results}, indent=1))
    names = list(results)
    print(f"\n{card}: seconds, random SD 2.1-base, 1 image 512x512, 50 steps, CFG 7.5, fp16 (process 1: empty kernel caches)")
    print("| stage | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for stage in STAGES + ["total"]:
        print(f"| {stage} | " + " | ".join(f"{results[n]['stages'][stage]:.2f}" for n in names) + " |")
    for key, label in (("new_batch_4", "new batch size (4 images)"), ("new_size_768", "new resolution (768 px)")):
        print(f"| {label}: extra before first step | " + " | ".join(f"{results[n][key]['extra_step_s']:.2f}" for n in names) + " |")
        print(f"| {label}: extra on first decode | " + " | ".join(f"{results[n][key]['extra_decode_s']:.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
