"""The server's throughput and its overhead per image over loopback, against the library in-process.

For each model and request shape:

1. the library alone, in this process: ``generate_latents(seed=...)`` to the last step, ``decode``,
   ``images.to_uint8`` (what the server runs for one image), median of ``--repeats`` after a warm-up;
2. the server (``python -m stable_diffusion.server``, started as the tests start it), over loopback
   with httpx: one client sending ``--requests`` txt2img requests one after another (requests/s, and
   each request's wall time), then ``--clients`` clients at once sending as many in total;
3. the overhead per image: the median request's wall time minus the library's median time, in ms and
   as a ratio (request / library). It holds HTTP, JSON, the request checks, the queue hand-off, PNG
   encoding with the infotext and base64.

The two never run at once: while the server computes, this process only waits on its sockets.

    python bench/server.py --models /tmp/bench_server --json bench/results/cpu_server.json
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry"
# (model label, width = height in px, steps): a near-empty job that shows the fixed cost, and longer ones.
SHAPES = {
    "tiny": [(32, 1), (32, 10), (64, 10)],
    "sd15-toy": [(64, 1), (64, 10)],
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="/tmp/bench_server", help="folder for the random models (built once)")
    p.add_argument("--only", default=None, help="comma-separated model labels to run (tiny, sd15-toy)")
    p.add_argument("--requests", type=int, default=20, help="requests per measurement")
    p.add_argument("--clients", type=int, default=8, help="clients at once in the concurrent measurement")
    p.add_argument("--repeats", type=int, default=7, help="in-process library runs per shape")
    p.add_argument("--json", default=None, help="write the numbers here")
    return p.parse_args()


def build_models(folder: Path) -> dict:
    """The tests' tiny SD 1.x model, and SD 1.5's real block layout at toy width (bench/_models.py)."""
    import _models
    import tiny_models

    folder.mkdir(parents=True, exist_ok=True)
    models = {"tiny": folder / "tiny_sd1", "sd15-toy": folder / "sd15_toy"}
    if not (models["tiny"] / "model_index.json").exists():
        vocab = tiny_models.write_clip_vocab(folder / "vocab")
        tiny_models.build_sd(models["tiny"], vocab, "sd1")
    if not (models["sd15-toy"] / "model_index.json").exists():
        tokenizers = folder / "tokenizers"
        if not (tokenizers / "pad_eos" / "vocab.json").exists():
            _models.write_tokenizers(tokenizers)
        _models.make_model(models["sd15-toy"], tokenizers, "sd15", tiny=True)
    return models


def request_body(size: int, steps: int, seed: int) -> dict:
    return {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": seed, "steps": steps, "cfg_scale": 7.0, "width": size, "height": size, "sampler_name": "Euler"}


def library_time(sd, size: int, steps: int, repeats: int) -> float:
    """Median seconds of one image through the library: denoise, decode, to uint8."""
    import mlx.core as mx

    from stable_diffusion import images

    f = sd.latent_factor
    times = []
    for seed in range(repeats + 1):
        t0 = time.perf_counter()
        for x in sd.generate_latents(PROMPT, negative_text=NEGATIVE, num_steps=steps, cfg_weight=7.0, latent_size=(size // f, size // f), seed=seed, sampler="Euler"):
            mx.eval(x)
        images.to_uint8(sd.decode(x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first run compiles and warms the caches


def post(client, url: str, body: dict) -> float:
    t0 = time.perf_counter()
    response = client.post(url + "/sdapi/v1/txt2img", json=body, timeout=600)
    elapsed = time.perf_counter() - t0
    if response.status_code != 200 or len(response.json()["images"]) != 1:
        raise RuntimeError(f"the server answered {response.status_code}: {response.text[:300]}")
    return elapsed


def sequential(url: str, size: int, steps: int, n: int) -> dict:
    import httpx

    with httpx.Client() as client:
        post(client, url, request_body(size, steps, 10**6))  # warm-up: the server's first job compiles
        t0 = time.perf_counter()
        walls = [post(client, url, request_body(size, steps, seed)) for seed in range(n)]
        total = time.perf_counter() - t0
    return {"requests_per_s": n / total, "median_request_s": statistics.median(walls), "walls_s": walls}


def concurrent(url: str, size: int, steps: int, n: int, clients: int) -> dict:
    import httpx

    seeds = iter(range(n))
    lock = threading.Lock()
    errors = []

    def client_loop():
        with httpx.Client() as client:
            while True:
                with lock:
                    seed = next(seeds, None)
                if seed is None:
                    return
                try:
                    post(client, url, request_body(size, steps, seed))
                except Exception as e:  # reported after the run
                    errors.append(e)
                    return

    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return {"clients": clients, "requests_per_s": n / total}


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or platform.machine()


def main():
    args = parse_args()
    from server_process import serve

    from stable_diffusion import load_model

    models = build_models(Path(args.models))
    labels = args.only.split(",") if args.only else list(SHAPES)
    rows = []
    for label in labels:
        sd = load_model(str(models[label]), sampler_rules="a1111")  # the server's rules
        with serve(models[label]) as server:
            for size, steps in SHAPES[label]:
                lib = library_time(sd, size, steps, args.repeats)
                seq = sequential(server.url, size, steps, args.requests)
                conc = concurrent(server.url, size, steps, args.requests, args.clients)
                lib_after = library_time(sd, size, steps, args.repeats)  # the machine is shared: bracket the server runs
                lib_s = statistics.median([lib, lib_after])
                overhead = seq["median_request_s"] - lib_s
                row = {
                    "model": label,
                    "size": size,
                    "steps": steps,
                    "library_s": lib_s,
                    "library_s_before_after": [lib, lib_after],
                    "sequential": seq,
                    "concurrent": conc,
                    "overhead_ms": overhead * 1000,
                    "ratio": seq["median_request_s"] / lib_s,
                }
                rows.append(row)
                print(
                    f"{label:9s} {size:4d}px {steps:3d} steps: library {lib_s * 1000:7.1f} ms | request {seq['median_request_s'] * 1000:7.1f} ms"
                    f" | overhead {overhead * 1000:6.1f} ms ({row['ratio']:.2f}x) | {seq['requests_per_s']:.2f} req/s sequential,"
                    f" {conc['requests_per_s']:.2f} req/s with {args.clients} clients",
                    flush=True,
                )
        del sd
    result = {"cpu": cpu_name(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
