"""Time to the first image in a new process, split by stage, and its peak memory: our MLX pipeline against diffusers (eager).

Per family (``--family``: sd21 = SD 2.1-base, sd15 = SD 1.5, sdxl = SDXL base 1.0), both load the same
files: a random-weight model with the real config.json values of the family's Hub repo, float16
safetensors in the diffusers layout, real CLIP BPE tokenizers, Euler in both (``bench/_models.py``,
written by ``--make-model``). 1 image, 50 steps, classifier-free guidance 7.5 (empty negative
prompt), fp16; 512x512 for SD 1.5 / 2.1-base, 1024x1024 for SDXL. Ours: ``StableDiffusion`` /
``StableDiffusionXL``; diffusers: ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``. Both
decode as the pipelines do: the SDXL VAE (force_upcast) in float32, the SD VAE in float16.

Each (family, implementation) runs in two fresh processes one after the other. Before the first,
the kernel caches are empty: MLX's cache of the kernels it generates (``MLX_PTX_CACHE_DIR``) and the
driver's cache of what it JIT-compiles from PTX (``CUDA_CACHE_PATH``), each pointed at a new folder
for this family and implementation, and the OS page cache is dropped where allowed. So process 1 is
a fresh machine, process 2 the next run. Stages (wall clock, synchronised):

    imports       interpreter start -> the library and the pipeline class imported
    load          pipeline built, every weight on the device
    first step    text encoding + the first denoising step (compilation of the UNet's kernels lands here)
    other steps   the remaining 49 steps
    decode        VAE decode of the latent to a host image (compilation of the VAE's kernels lands here)

Peak memory (active buffers, not the allocators' caches): ``mx.get_peak_memory()`` against
``torch.cuda.max_memory_allocated()``, over the first image with the weights resident (the peak is
reset after loading; the load's own peak and the weights are reported apart). Then, in the same
(now warm) process: a new batch size (4 images: UNet batch 8) and a new resolution (768 px, 1 image),
each as the extra time of its first step over its next steps, and of its first decode over its second.

Result lines print as each process ends, the JSON is rewritten after each, and one table per family
prints at the end. Each child has ``--timeout`` seconds; no child starts that could run past
``--deadline`` seconds from the start, so the tables come out inside one 10-minute call.

    python bench/generate.py --write-tokenizer bench/_tokenizer      # once, here (needs open_clip_torch)
    # GPU machine (carry .mlx-cuda and bench/_tokenizer):
    source .mlx-cuda/setup.sh && python3 bench/coldstart.py --family sd21,sd15,sdxl --make-model /tmp/models --json $OUT/coldstart.json
    # CPU smoke test (toy widths, small images; both in float32 on CPU):
    python bench/coldstart.py --family sd21,sd15,sdxl --make-model /tmp/cs --tiny
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
import _models  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
STEPS, CFG, NEW_BATCH = 50, 7.5, 4
STAGES = ["imports", "load", "first step", "other steps", "decode", "total"]


def sizes(family: str, tiny: bool) -> tuple:
    """(first image, new resolution) in pixels."""
    spec = _models.FAMILIES[family]
    return (spec["tiny_size"], spec["tiny_new_size"]) if tiny else (spec["size"], spec["new_size"])


def child_mlx(args, t0):
    sys.path.insert(0, str(ROOT))
    import mlx.core as mx
    import numpy as np

    from stable_diffusion.pipeline import StableDiffusion, StableDiffusionXL

    marks = {"imports": time.time() - t0}
    t = time.time()
    cls = StableDiffusionXL if args.family == "sdxl" else StableDiffusion
    float16 = mx.default_device() == mx.gpu  # float32 on CPU, as diffusers there
    sd = cls(args.model, float16=float16)
    sd.ensure_models_are_loaded()
    marks["load"] = time.time() - t
    memory = {"load_peak_bytes": mx.get_peak_memory(), "weights_bytes": mx.get_active_memory()}
    mx.reset_peak_memory()

    def steps(n, size, count):
        """Times of the first `count` steps (each evaluated), and the last latent."""
        times, x = [], None
        start = time.time()
        gen = sd.generate_latents(PROMPT, n_images=n, num_steps=STEPS, cfg_weight=CFG, latent_size=(size // 8, size // 8), seed=0)
        for i, x in enumerate(gen):
            mx.eval(x)
            times.append(time.time() - start)
            start = time.time()
            if i + 1 == count:
                break
        return times, x

    def decode(x):
        return (np.array(sd.decode(x)) * 255).round().astype(np.uint8)

    info = {"device": f"{mx.default_device()} ({'float16' if float16 else 'float32'})", "versions": {"mlx": mx.__version__}}
    return marks, memory, info, steps, decode, mx.get_peak_memory


def child_diffusers(args, t0):
    import numpy as np
    import torch
    import transformers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging

    marks = {"imports": time.time() - t0}
    diffusers_logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t = time.time()
    if args.family == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(args.model, torch_dtype=dtype, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    pipe = pipe.to(dev)
    pipe.set_progress_bar_config(disable=True)
    sync()
    marks["load"] = time.time() - t
    memory = {"load_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None, "weights_bytes": torch.cuda.memory_allocated() if cuda else None}
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def steps(n, size, count):
        times, state = [], {"start": time.time()}

        def on_step(p, i, timestep, kwargs):
            sync()
            times.append(time.time() - state["start"])
            state["start"] = time.time()
            if i + 1 == count:
                p._interrupt = True
            return kwargs

        g = torch.Generator(dev).manual_seed(0)
        out = pipe(PROMPT, num_images_per_prompt=n, num_inference_steps=STEPS, guidance_scale=CFG, height=size, width=size,
                   generator=g, output_type="latent", callback_on_step_end=on_step)
        return times, out.images

    def decode(latents):
        """The pipelines' own decode: StableDiffusionXLPipeline upcasts a force_upcast VAE to float32 and back."""
        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        with torch.no_grad():
            if upcast:
                vae.to(dtype=torch.float32)
                latents = latents.to(torch.float32)
            image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
            if upcast:
                vae.to(dtype=torch.float16)
            image = pipe.image_processor.postprocess(image, output_type="np")
        return (image * 255).round().astype(np.uint8)

    import diffusers

    info = {"device": torch.cuda.get_device_name() if cuda else "cpu (float32)",
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}}
    peak = torch.cuda.max_memory_allocated if cuda else (lambda: None)
    return marks, memory, info, steps, decode, peak


def run_child(args):
    """One process: the first image by stage, then the new batch size and resolution; a line per part."""
    t0 = args.t0
    marks, memory, info, steps, decode, peak = (child_mlx if args.child == "mlx" else child_diffusers)(args, t0)
    size, new_size = sizes(args.family, args.tiny)
    times, x = steps(1, size, STEPS)
    marks["first step"], marks["other steps"] = times[0], sum(times[1:])
    t = time.time()
    image = decode(x)
    marks["decode"] = time.time() - t
    marks["total"] = time.time() - t0
    memory["peak_1_image_bytes"] = peak()
    first = {"stages": marks, "memory": memory, **info, "size": size, "steps": len(times), "image_mean": float(image.mean())}
    print("RESULT first " + json.dumps(first), flush=True)
    for key, n, s in ((f"new_batch_{NEW_BATCH}", NEW_BATCH, size), (f"new_size_{new_size}", 1, new_size)):
        try:
            print(f"RESULT {key} " + json.dumps(_extras(steps, decode, n, s)), flush=True)
        except Exception as e:  # e.g. out of memory: the first image's numbers stand
            print(f"RESULT {key} " + json.dumps({"error": f"{type(e).__name__}: {e}"[:300]}), flush=True)
    os._exit(0)  # everything is printed: skip the interpreter's teardown (CUDA contexts, thread pools)


def _extras(steps, decode, n, size):
    """Extra seconds of the first step and the first decode of a new shape, over the next ones."""
    times, x = steps(n, size, 6)
    t = time.time()
    decode(x)
    first_decode = time.time() - t
    t = time.time()
    decode(x)
    second_decode = time.time() - t
    step = statistics.median(times[2:])
    return {"first_step_s": times[0], "step_s": step, "extra_step_s": times[0] - step,
            "first_decode_s": first_decode, "decode_s": second_decode, "extra_decode_s": first_decode - second_decode}


def spawn(cmd, env, timeout):
    """Run a child; (its RESULT parts, an error line or None, seconds)."""
    t0 = time.time()
    try:
        r = subprocess.run(cmd + ["--t0", repr(t0)], capture_output=True, text=True, env=env, timeout=timeout)
        out, err, failure = r.stdout, r.stderr, f"exit {r.returncode}" if r.returncode else None
    except subprocess.TimeoutExpired as e:
        decode = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        out, err, failure = decode(e.stdout), decode(e.stderr), f"killed after its {timeout:.0f} s timeout"
    parts = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            key, _, value = line[len("RESULT "):].partition(" ")
            parts[key] = json.loads(value)
    if failure and err.strip():
        failure += ":\n" + "\n".join(err.strip().splitlines()[-25:])
    return parts, failure, time.time() - t0


def card_name() -> str:
    try:
        names = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout
        return names.strip().splitlines()[0] if names.strip() else "CPU"
    except (OSError, subprocess.SubprocessError):
        return "CPU"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--family", default="sd21", help="comma-separated: sd21 (SD 2.1-base), sd15 (SD 1.5), sdxl (SDXL base 1.0)")
    p.add_argument("--make-model", default=None, help="folder for the random models: one subfolder per family (sd21/, sdxl-tiny/, ...), each written once")
    p.add_argument("--model", default=None, help="an existing diffusers-format model folder instead (one family only)")
    p.add_argument("--tokenizer", default=str(ROOT / "bench" / "_tokenizer"), help="the folder of `bench/generate.py --write-tokenizer`, for --make-model")
    p.add_argument("--tiny", action="store_true", help="toy-width models and small images (CPU smoke test)")
    p.add_argument("--impl", default="mlx,diffusers", help="implementations to run")
    p.add_argument("--timeout", type=float, default=240, help="seconds one child process (or one model write) may take")
    p.add_argument("--deadline", type=float, default=570, help="seconds from the start by which all children end: none starts with under 30 s left, each is cut off 10 s before")
    p.add_argument("--json", default=None, help="write all numbers here (rewritten after every process)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--t0", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.families = args.family.split(",")
    unknown = [f for f in args.families if f not in _models.FAMILIES]
    if unknown:
        p.error(f"unknown family {unknown[0]!r}; choose from {', '.join(_models.FAMILIES)}")
    if not args.child and not (args.make_model or args.model):
        p.error("give --make-model DIR (written once) or --model DIR")
    if args.model and len(args.families) > 1 and not args.child:
        p.error("--model serves one family; give --make-model for several")
    return args


def main():
    args = parse_args()
    if args.child == "write":
        _models.make_model(Path(args.model), Path(args.tokenizer), args.family, args.tiny)
        print("RESULT written {}", flush=True)
        return
    if args.child:
        args.family = args.families[0]
        run_child(args)
        return

    start = time.time()
    card = card_name()
    print(f"card: {card}; command: python {' '.join(sys.argv)}", flush=True)
    report = {"card": card, "argv": sys.argv, "families": {}}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))

    def time_left(what):
        left = args.deadline - (time.time() - start)
        if left < 30:
            print(f"{what}: skipped, {left:.0f} s left before the {args.deadline:.0f} s deadline", flush=True)
            return None
        return min(args.timeout, left - 10)

    for family in args.families:
        size, new_size = sizes(family, args.tiny)
        entry = report["families"][family] = {"label": _models.FAMILIES[family]["label"], "size": size, "new_size": new_size,
                                              "tiny": args.tiny, "results": {}, "errors": {}}
        model = args.model or str(Path(args.make_model) / (family + ("-tiny" if args.tiny else "")))
        entry["model"] = model
        if args.model and not (Path(model) / "model_index.json").exists():
            print(f"{family}: {model} has no model_index.json", flush=True)
            entry["errors"]["model"] = f"{model} has no model_index.json"
            continue
        if not (Path(model) / "model_index.json").exists():
            timeout = time_left(f"{family} model write")
            if timeout is None:
                continue
            cmd = [sys.executable, __file__, "--child", "write", "--family", family, "--model", model, "--tokenizer", args.tokenizer]
            _, failure, seconds = spawn(cmd + (["--tiny"] if args.tiny else []), os.environ, timeout)
            if failure:
                print(f"{family}: writing the random model failed ({failure})", flush=True)
                entry["errors"]["write"] = failure
                save()
                continue
            print(f"{family}: wrote the random model to {model} in {seconds:.0f} s", flush=True)
        for impl in args.impl.split(","):
            caches = Path(tempfile.mkdtemp(prefix=f"coldstart_{family}_{impl}_"))
            env = dict(os.environ, MLX_PTX_CACHE_DIR=str(caches / "mlx"), CUDA_CACHE_PATH=str(caches / "nv"))
            for proc in (1, 2):
                name = f"{impl} p{proc}"
                timeout = time_left(f"{family} {name}")
                if timeout is None:
                    break
                if proc == 1:
                    dropped = subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, stderr=subprocess.DEVNULL).returncode == 0
                    entry.setdefault("page_cache_dropped", {})[impl] = dropped
                cmd = [sys.executable, __file__, "--child", impl, "--family", family, "--model", model]
                parts, failure, _ = spawn(cmd + (["--tiny"] if args.tiny else []), env, timeout)
                got_first = "first" in parts
                if got_first:
                    result = {**parts.pop("first"), **parts}
                    entry["results"][name] = result
                    print(f"{family} {name}: {json.dumps(result)}", flush=True)
                if failure:
                    print(f"{family} {name} failed ({failure})", flush=True)
                    entry["errors"][name] = failure
                save()
                if not got_first:
                    break  # no first image: a second process would not be a second run
    print(f"\nall done in {time.time() - start:.0f} s", flush=True)
    for family, entry in report["families"].items():
        print_table(card, family, entry)


def print_table(card, family, entry):
    results = entry["results"]
    if not results:
        print(f"\n{entry['label']}: no results ({'; '.join(entry['errors'])} failed)")
        return
    names = list(results)
    dropped = entry.get("page_cache_dropped", {})
    precision = "float32 on CPU" if any("float32" in r.get("device", "") for r in results.values()) else "fp16"
    print(f"\n{card}: seconds, random {entry['label']} weights{' (tiny)' if entry['tiny'] else ''}, 1 image {entry['size']}x{entry['size']}, "
          f"{STEPS} steps, CFG {CFG}, Euler, {precision}. Process 1: empty kernel caches, page cache "
          f"{'dropped' if dropped and all(dropped.values()) else 'not dropped (not allowed here)'}")
    print("| stage | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))

    def row(label, get, fmt="{:.2f}"):
        cells = []
        for n in names:
            try:
                cells.append(fmt.format(get(results[n])))
            except (KeyError, TypeError):
                cells.append("-")
        print(f"| {label} | " + " | ".join(cells) + " |")

    for stage in STAGES:
        label = {"first step": "text encoding + first step", "other steps": f"other {STEPS - 1} steps", "total": "**time to first image**"}.get(stage, stage)
        row(label, lambda r, s=stage: r["stages"][s])
    row("peak memory, weights + 1 image (GB)", lambda r: r["memory"]["peak_1_image_bytes"] / 1e9)
    row("weights resident after load (GB)", lambda r: r["memory"]["weights_bytes"] / 1e9)
    row("peak memory while loading (GB)", lambda r: r["memory"]["load_peak_bytes"] / 1e9)
    for key, label in ((f"new_batch_{NEW_BATCH}", f"new batch size ({NEW_BATCH} images)"), (f"new_size_{entry['new_size']}", f"new resolution ({entry['new_size']} px)")):
        row(f"{label}: extra before its first step", lambda r, k=key: r[k]["extra_step_s"])
        row(f"{label}: extra on its first decode", lambda r, k=key: r[k]["extra_decode_s"])
    for proc in (1, 2):
        ours, theirs = results.get(f"mlx p{proc}"), results.get(f"diffusers p{proc}")
        if ours and theirs:
            a, b = ours["stages"]["total"], theirs["stages"]["total"]
            pa, pb = ours["memory"]["peak_1_image_bytes"], theirs["memory"]["peak_1_image_bytes"]
            verdict = f"{pa / 1e9:.2f} GB vs {pb / 1e9:.2f} GB ({'ours <= diffusers' if pa <= pb else 'ours > diffusers'})" if pb else "n/a (no CUDA)"
            print(f"process {proc}: time to first image MLX/diffusers {a / b:.2f}x; peak memory {verdict}")
    for name, error in entry["errors"].items():
        print(f"{name} failed: {error.splitlines()[0]}")


if __name__ == "__main__":
    main()
