"""The server's throughput and its overhead per image over loopback, against the library in-process.

For each model and request shape, ``--requests`` rounds of:

1. one image through the library in this process: ``generate_latents(seed=...)`` to the last step,
   ``decode``, ``images.to_uint8`` (what the server runs for one image), wall and CPU time;
2. the same image as one txt2img request to the server (``python -m stable_diffusion.server``,
   started as the tests start it) over loopback with httpx: its wall time, and the server process's
   CPU time (all threads, /proc) around it.

The two alternate, so the load of other processes on a shared machine falls on both alike; they
never run at once. The overhead per image is request - library: the median of the paired wall-time
differences, and the mean CPU time of the server per request minus the library's per image (CPU time
is what other processes on the machine disturb least). It holds HTTP, JSON, the request checks, the
queue hand-off, PNG encoding with the infotext and base64. Then requests/s: one client sending
``--requests`` back to back, and ``--clients`` clients at once sending as many in total.

    python bench/server.py --models /tmp/bench_server --json bench/results/cpu_server.json
"""

import argparse
import json
import os
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
    "sd15": [(512, 1), (512, 20)],  # full width: for a GPU (--only sd15 --float16)
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="/tmp/bench_server", help="folder for the random models (built once)")
    p.add_argument("--only", default="tiny,sd15-toy", help="comma-separated model labels to run (tiny, sd15-toy; sd15: SD 1.5's full width, for a GPU)")
    p.add_argument("--float16", action="store_true", help="run the library and the server in float16")
    p.add_argument("--requests", type=int, default=20, help="rounds (library image + request) per shape, and requests per throughput run")
    p.add_argument("--clients", type=int, default=8, help="clients at once in the concurrent measurement")
    p.add_argument("--json", default=None, help="write the numbers here")
    return p.parse_args()


def build_models(folder: Path, labels: list) -> dict:
    """The tests' tiny SD 1.x model, SD 1.5's real block layout at toy width, and at full width (bench/_models.py, random weights)."""
    import _models
    import tiny_models

    folder.mkdir(parents=True, exist_ok=True)
    models = {"tiny": folder / "tiny_sd1", "sd15-toy": folder / "sd15_toy", "sd15": folder / "sd15"}
    for label in labels:
        if (models[label] / "model_index.json").exists():
            continue
        if label == "tiny":
            tiny_models.build_sd(models[label], tiny_models.write_clip_vocab(folder / "vocab"), "sd1")
            continue
        tokenizers = ROOT / "bench" / "_tokenizer"  # written by bench/generate.py --write-tokenizer
        if not (tokenizers / "pad_eos" / "vocab.json").exists():
            tokenizers = folder / "tokenizers"
            _models.write_tokenizers(tokenizers)
        _models.make_model(models[label], tokenizers, "sd15", tiny=label == "sd15-toy")
    return models


def request_body(size: int, steps: int, seed: int) -> dict:
    return {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": seed, "steps": steps, "cfg_scale": 7.0, "width": size, "height": size, "sampler_name": "Euler"}


def library_image(sd, size: int, steps: int, seed: int) -> tuple[float, float]:
    """(wall s, CPU s of this process) of one image through the library: denoise, decode, to uint8."""
    import mlx.core as mx

    from stable_diffusion import images

    f = sd.latent_factor
    w0, c0 = time.perf_counter(), time.process_time()
    for x in sd.generate_latents(PROMPT, negative_text=NEGATIVE, num_steps=steps, cfg_weight=7.0, latent_size=(size // f, size // f), seed=seed, sampler="Euler"):
        mx.eval(x)
    images.to_uint8(sd.decode(x))
    return time.perf_counter() - w0, time.process_time() - c0


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads (Linux /proc; 10 ms ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def post(client, url: str, body: dict) -> float:
    t0 = time.perf_counter()
    response = client.post(url + "/sdapi/v1/txt2img", json=body, timeout=600)
    elapsed = time.perf_counter() - t0
    if response.status_code != 200 or len(response.json()["images"]) != 1:
        raise RuntimeError(f"the server answered {response.status_code}: {response.text[:300]}")
    return elapsed


def paired(sd, server, size: int, steps: int, n: int) -> dict:
    """n rounds of (one image in-process, the same image as one request), alternating so that the
    machine's other load falls on both alike; the server's CPU time is read around each request."""
    import httpx

    library_wall, library_cpu, request_wall, server_cpu = [], [], [], []
    with httpx.Client() as client:
        library_image(sd, size, steps, 10**6)  # warm-up: each side's first job compiles and fills caches
        post(client, server.url, request_body(size, steps, 10**6))
        for seed in range(n):
            wall, cpu = library_image(sd, size, steps, seed)
            library_wall.append(wall)
            library_cpu.append(cpu)
            c0 = process_cpu_s(server.process.pid)
            request_wall.append(post(client, server.url, request_body(size, steps, seed)))
            server_cpu.append(process_cpu_s(server.process.pid) - c0)
        t0 = time.perf_counter()
        for seed in range(n):  # back to back: requests/s of one client
            post(client, server.url, request_body(size, steps, seed))
        sequential = n / (time.perf_counter() - t0)
    return {
        "library_wall_s": library_wall,
        "library_cpu_s": library_cpu,
        "request_wall_s": request_wall,
        "server_cpu_s": server_cpu,
        "sequential_requests_per_s": sequential,
    }


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
    import mlx.core as mx
    from server_process import serve

    from stable_diffusion import load_model

    labels = args.only.split(",")
    models = build_models(Path(args.models), labels)
    rows = []
    for label in labels:
        sd = load_model(str(models[label]), float16=args.float16, sampler_rules="a1111")  # the server's rules for Euler (generation.sampler_rules)
        with serve(models[label], *(["--float16"] if args.float16 else []), timeout=900) as server:
            for size, steps in SHAPES[label]:
                row = {"model": label, "size": size, "steps": steps, **paired(sd, server, size, steps, args.requests)}
                row["concurrent"] = concurrent(server.url, size, steps, args.requests, args.clients)
                lib_wall, req_wall = statistics.median(row["library_wall_s"]), statistics.median(row["request_wall_s"])
                lib_cpu, srv_cpu = statistics.mean(row["library_cpu_s"]), statistics.mean(row["server_cpu_s"])
                row["overhead_wall_ms"] = statistics.median(r - w for r, w in zip(row["request_wall_s"], row["library_wall_s"])) * 1000
                row["overhead_cpu_ms"] = (srv_cpu - lib_cpu) * 1000
                rows.append(row)
                print(
                    f"{label:9s} {size:4d}px {steps:3d} steps | wall: library {lib_wall * 1000:7.1f} ms, request {req_wall * 1000:7.1f} ms,"
                    f" overhead {row['overhead_wall_ms']:6.1f} ms ({req_wall / lib_wall:.2f}x) | CPU: library {lib_cpu * 1000:7.1f} ms,"
                    f" server {srv_cpu * 1000:7.1f} ms, overhead {row['overhead_cpu_ms']:6.1f} ms ({srv_cpu / lib_cpu:.2f}x)"
                    f" | {row['sequential_requests_per_s']:.2f} req/s one client, {row['concurrent']['requests_per_s']:.2f} req/s {args.clients} clients",
                    flush=True,
                )
        del sd
    result = {"cpu": cpu_name(), "gpu": mx.cuda.is_available(), "float16": args.float16, "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "load_average": os.getloadavg(), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
