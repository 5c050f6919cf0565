"""Many-image jobs: the split over ranks, per-image noise, and mlx.launch (ring backend, 2 CPU ranks on localhost).

The launched runs must write exactly the files a single process writes (pixels and parameters),
a rank killed mid-job must leave only whole files and a message saying how to finish, and
``--resume`` must finish the job with the same pixels.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from stable_diffusion import distributed, images
from stable_diffusion.pipeline import StableDiffusion

ROOT = Path(__file__).resolve().parents[1]
T2I = str(ROOT / "txt2image.py")
LAUNCH = Path(sys.executable).parent / "mlx.launch"
PROMPTS = "a red, round: apple\n\na blue car\n"
# 2 prompts x 4 seeds = 8 images, one a batch: 4 rounds of 2 batches on 2 ranks. euler_a draws step noise.
JOB = ["--seeds", "3,5-7", "--batch_size", 1, "--steps", 2, "--width", 32, "--height", 32, "--sampler", "euler_a", "--no-float16"]
N_IMAGES = 8
# The same job with more steps per image: a rank killed once the first image is written still has
# whole seconds of work left, however busy the machine is.
SLOW_JOB = [*JOB[: JOB.index("--steps") + 1], 12, *JOB[JOB.index("--steps") + 2 :]]


# ---------------------------------------------------------------------------------------------
# The job's items, batches and shares


@pytest.mark.parametrize(
    "text, seeds",
    [("7", [7]), ("1,2,3", [1, 2, 3]), ("10-13", [10, 11, 12, 13]), ("1, 5-7,2", [1, 5, 6, 7, 2])],
)
def test_parse_seeds_reads_lists_and_inclusive_ranges(text, seeds):
    assert distributed.parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["", "a", "3-1", "1,1", "-5", "1-2-3", "18446744073709551616", "18446744073709551615-18446744073709551616"])
def test_parse_seeds_refuses_malformed_lists(text):
    with pytest.raises(ValueError, match="--seeds"):
        distributed.parse_seeds(text)


def test_batches_are_fixed_by_the_job_and_every_k_covers_them_once():
    items = distributed.make_items(3, [1, 2, 3, 4, 5])
    assert [it.k for it in items] == list(range(1, 16))
    assert [(it.source, it.seed) for it in items[4:7]] == [(0, 5), (1, 1), (1, 2)]
    batches = distributed.make_batches(items, 2)
    assert [[it.k for it in b] for b in batches[:4]] == [[1, 2], [3, 4], [5], [6, 7]]  # never across prompts
    for size in (1, 2, 4, 7):
        shares = [distributed.share(len(batches), rank, size) for rank in range(size)]
        assert sorted(b for s in shares for b in s) == list(range(len(batches)))


def test_seed_and_n_images_number_the_images_as_a1111():
    assert distributed.seeds_for(41, 3) == [41, 42, 43]


# ---------------------------------------------------------------------------------------------
# Per-image noise: an image of a batch starts from the noise of its seed's one-image run


def _final(latents):
    x = None
    for x in latents:
        mx.eval(x)
    return np.array(x)


def test_each_image_of_a_batch_is_its_seeds_one_image_run(tiny_sd1):
    sd = StableDiffusion(str(tiny_sd1), sampler="euler_a")
    common = dict(num_steps=3, cfg_weight=3.0)
    alone = {s: _final(sd.generate_latents("a cat", seed=s, latent_size=(8, 8), **common)) for s in (4, 9)}
    for s in (4, 9):  # one item: the facade's own draw, bit for bit
        mine = sd.generate_latents("a cat", latents=distributed.initial_noise([s], (8, 8, 4)), step_noise=distributed.step_noise([s], 3), **common)
        assert np.array_equal(_final(mine), alone[s])
    both = sd.generate_latents("a cat", n_images=2, latents=distributed.initial_noise([4, 9], (8, 8, 4)), step_noise=distributed.step_noise([4, 9], 3), **common)
    both = _final(both)
    for row, s in enumerate((4, 9)):  # in a batch: the same up to the batched kernels' rounding
        np.testing.assert_allclose(both[row], alone[s][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [2**63 - 1, 2**63, 2**64 - 1])
def test_a_seed_past_int64_draws_the_facades_noise(tiny_sd1, seed):
    sd = StableDiffusion(str(tiny_sd1), sampler="euler_a")
    common = dict(num_steps=2, cfg_weight=3.0)
    alone = _final(sd.generate_latents("a cat", seed=seed, latent_size=(8, 8), **common))
    mine = sd.generate_latents("a cat", latents=distributed.initial_noise([seed], (8, 8, 4)), step_noise=distributed.step_noise([seed], 2), **common)
    assert np.array_equal(_final(mine), alone)


@pytest.mark.parametrize("seed", [0, 2**63 - 1, 2**63, 2**64 - 1])
def test_broadcast_seed_keeps_every_seed_of_64_bits(seed):
    assert distributed.Group().broadcast_seed(lambda: seed) == seed


# ---------------------------------------------------------------------------------------------
# The scripts, in one process and under mlx.launch


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _free_port_pair() -> int:
    """A port P with P and P + 1 free: the ring backend listens on --starting-port + rank."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no two consecutive free ports")


def launch_command(n: int, *args) -> list[str]:
    if not LAUNCH.exists():
        pytest.fail("mlx.launch is not installed beside this Python (it comes with mlx)", pytrace=False)
    return [str(LAUNCH), "-n", str(n), "--backend", "ring", "--starting-port", str(_free_port_pair()), "--", sys.executable, *map(str, args)]


def run(command, cwd):
    command = [str(c) for c in command]
    return subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=cwd, timeout=600)


def ok(result):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "WARN" not in result.stderr, result.stderr
    return result


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "prompts.txt")


@pytest.fixture(scope="module")
def job_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("job")
    (folder / "prompts.txt").write_text(PROMPTS)
    return folder


@pytest.fixture(scope="module")
def single(tiny_sd1, job_folder) -> Path:
    """The reference: the job in one process, without mlx.launch."""
    out = job_folder / "one" / "img.png"
    out.parent.mkdir()
    result = ok(run([sys.executable, T2I, "--prompts", job_folder / "prompts.txt", "--model", tiny_sd1, *JOB, "--grid", "--n_rows", 2, "-o", out], job_folder))
    assert f"saved {N_IMAGES} images" in result.stdout
    return out


@pytest.fixture(scope="module")
def single_slow(tiny_sd1, job_folder) -> Path:
    out = job_folder / "one_slow" / "img.png"
    out.parent.mkdir()
    ok(run([sys.executable, T2I, "--prompts", job_folder / "prompts.txt", "--model", tiny_sd1, *SLOW_JOB, "-o", out], job_folder))
    return out


def test_a_prompt_file_writes_one_file_per_image_in_job_order(single):
    names = files(single.parent)
    assert names == ["img.png"] + sorted(f"img_{k}.png" for k in range(1, N_IMAGES + 1))
    for k in range(1, N_IMAGES + 1):
        p = images.parse_parameters(images.read_parameters(single.with_name(f"img_{k}.png")))
        prompt, seed = ("a red, round: apple", "a blue car")[(k - 1) // 4], (3, 5, 6, 7)[(k - 1) % 4]
        assert (p["Prompt"], p["Seed"], p["Sampler"], p["Size"]) == (prompt, str(seed), "Euler a", "32x32")
    grid = pixels(single)
    assert grid.shape == (2 * 32, 4 * 32, 3)
    assert np.array_equal(grid[32:, 64:96], pixels(single.with_name("img_7.png")))
    assert len({pixels(single.with_name(f"img_{k}.png")).tobytes() for k in range(1, N_IMAGES + 1)}) == N_IMAGES


def test_two_ranks_write_the_files_of_one_process(tiny_sd1, job_folder, single):
    out = job_folder / "two" / "img.png"
    out.parent.mkdir()
    command = launch_command(2, T2I, "--prompts", job_folder / "prompts.txt", "--model", tiny_sd1, *JOB, "--grid", "--n_rows", 2, "-o", out)
    result = ok(run(command, job_folder))
    assert result.stdout.count("saved") == 1  # rank 0 speaks for the job
    assert files(out.parent) == files(single.parent)
    for name in files(single.parent):
        assert np.array_equal(pixels(out.parent / name), pixels(single.parent / name)), name
        assert images.read_parameters(out.parent / name) == images.read_parameters(single.parent / name)


def test_every_rank_gets_rank_0s_seed_past_int64(tmp_path):
    script = tmp_path / "seed.py"
    # Each rank writes its own file: the ranks' stdout reaches us interleaved ("seedseed 1844... 1844...").
    script.write_text(
        "import os\nfrom stable_diffusion import distributed\n"
        f"seed = distributed.Group().broadcast_seed(lambda: {2**64 - 1})\n"
        f"open(os.path.join({str(tmp_path)!r}, 'seed' + os.environ['MLX_RANK']), 'w').write(str(seed))\n"
    )
    result = subprocess.run(launch_command(2, script), capture_output=True, text=True, env={**_env(), "PYTHONPATH": str(ROOT)}, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert [(tmp_path / f"seed{rank}").read_text() for rank in (0, 1)] == [str(2**64 - 1)] * 2


def test_a_busy_port_is_one_line_not_a_traceback(tmp_path):
    script = tmp_path / "join.py"
    script.write_text("from stable_diffusion import distributed\ndistributed.Group()\n")
    with socket.socket() as busy:  # another program listens on the port rank 0 must bind
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        command = launch_command(2, script)
        command[command.index("--starting-port") + 1] = str(busy.getsockname()[1])
        result = subprocess.run(command, capture_output=True, text=True, env={**_env(), "PYTHONPATH": str(ROOT)}, timeout=300)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("join.py: error:")]
    assert len(lines) == 1 and "cannot join the mlx.launch group" in lines[0] and "another --starting-port" in lines[0], result.stderr


def _rank_pid(launcher: int, rank: int):
    """The pid of the launcher's child that runs rank ``rank`` (mlx.launch sets MLX_RANK in its environment)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"MLX_RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def _rank_1_once_an_image_is_written(process, out) -> int:
    """The pid of the job's rank 1, once the job has written its first image."""
    deadline = time.time() + 300
    while not list(out.parent.glob("img_*.png")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    victim = _rank_pid(process.pid, 1)
    assert victim is not None, "rank 1 not found"
    return victim


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank's process through /proc")
def test_a_killed_rank_stops_the_job_with_a_message_and_resume_finishes_it(tiny_sd1, job_folder, single_slow):
    out = job_folder / "killed" / "img.png"
    out.parent.mkdir()
    command = launch_command(2, T2I, "--prompts", job_folder / "prompts.txt", "--model", tiny_sd1, *SLOW_JOB, "-o", out)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=job_folder)
    try:
        victim = _rank_1_once_an_image_is_written(process, out)
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    # What the user sees: mlx.launch's warning and rank 0's one-line account of the job (mlx.launch
    # 0.32.4 itself exits 0 whatever its ranks do, so the message is the signal).
    assert "rank 1 exited with code -9" in stderr, stderr
    # mlx.launch SIGTERMs the other ranks once it sees one fail; rank 0 holds SIGTERM while it waits
    # on its peer (Group.all_sum) and handles it otherwise, so its account is always given.
    lines = [ln for ln in stderr.splitlines() if ln.startswith("txt2image.py: error: the job stopped")]
    assert len(lines) == 1, stderr
    assert f"of {N_IMAGES} images are written" in lines[0] and "run the same command with --resume to finish" in lines[0]
    assert "Traceback" not in stderr
    done = {p.name: p.stat().st_mtime_ns for p in out.parent.glob("img_*.png")}
    assert 0 < len(done) < N_IMAGES, done
    for name in done:  # every final file is a whole image: written to a temporary file, then renamed
        assert np.array_equal(pixels(out.parent / name), pixels(single_slow.parent / name)), name

    # As a rank killed mid-write leaves it (its pid is dead now: the process was reaped).
    (out.parent / (images.temporary_prefix(out.with_name(f"img_{N_IMAGES}.png"), victim) + "x1y2z3w4.part")).write_bytes(b"\x89PNG half")
    result = ok(run(launch_command(2, T2I, "--prompts", job_folder / "prompts.txt", "--model", tiny_sd1, *SLOW_JOB, "-o", out, "--resume"), job_folder))
    assert f"--resume: {len(done)} of {N_IMAGES} images already written, skipped" in result.stdout
    assert files(out.parent) == [f for f in files(single_slow.parent) if f != "img.png"]  # no temporary file left either
    for name in files(out.parent):
        assert np.array_equal(pixels(out.parent / name), pixels(single_slow.parent / name)), name
    assert {name: (out.parent / name).stat().st_mtime_ns for name in done} == done  # finished files are not rewritten


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank's process through /proc")
def test_a_stopped_rank_times_out_with_a_message_and_leaves_whole_files(tiny_sd1, job_folder, single_slow):
    out = job_folder / "stopped" / "img.png"
    out.parent.mkdir()
    command = launch_command(2, T2I, "--prompts", job_folder / "prompts.txt", "--model", tiny_sd1, *SLOW_JOB, "-o", out)
    # 20 s: longer than rank 0 waits for a running peer on a busy machine, short for a test.
    env = {**_env(), distributed.TIMEOUT_VARIABLE: "20"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=job_folder)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)  # the launcher may never return
    reader.start()
    victim = None
    try:
        victim = _rank_1_once_an_image_is_written(process, out)
        os.kill(victim, signal.SIGSTOP)
        deadline = time.time() + 150  # the limit, plus a round of rank 0's own work, on a busy machine
        while not any("txt2image.py: error:" in ln for ln in lines) and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(1)  # rank 0's exit and mlx.launch's account of it
    finally:
        if victim is not None:
            os.kill(victim, signal.SIGKILL)  # a stopped process still dies of SIGKILL
        process.kill()  # mlx.launch waits on the stopped rank it SIGTERMed (the module docstring says why)
        process.wait(timeout=60)
        reader.join(timeout=60)
    stderr = "".join(lines)
    report = [ln for ln in stderr.splitlines() if ln.startswith("txt2image.py: error:")]
    assert len(report) == 1, stderr
    assert "the job stopped (rank 0 waited" in report[0] and "s for the other ranks: a rank stopped or hung?)" in report[0], report[0]
    assert "Traceback" not in stderr
    done = sorted(p.name for p in out.parent.glob("img_*.png"))
    assert 0 < len(done) < N_IMAGES, done
    assert f": {len(done)} of {N_IMAGES} images are written on this machine; run the same command with --resume to finish" in report[0], report[0]
    for name in done:  # every final file is a whole image
        assert np.array_equal(pixels(out.parent / name), pixels(single_slow.parent / name)), name


def test_the_watchdog_fires_for_a_collective_that_blocks():
    fired = threading.Event()
    with distributed.watchdog(0.2, fired.set):
        assert fired.wait(60)  # the fake collective: blocks until the watchdog fires


def test_the_watchdog_is_silent_for_a_collective_that_returns_in_time():
    fired = threading.Event()
    with distributed.watchdog(1.0, fired.set):
        pass
    assert not fired.wait(2.0)


def test_a_blocked_collective_exits_1_with_one_line(tmp_path):
    script = tmp_path / "stall.py"
    script.write_text(
        "import time\n"
        "import mlx.core as mx\n"
        "from stable_diffusion import distributed\n"
        "group = distributed.Group()\n"
        "group.size = 2  # as a rank of two, whose peer never answers\n"
        "mx.distributed.all_sum = lambda *args, **kwargs: time.sleep(600)\n"
        "group.all_sum(distributed.np.zeros(1))\n"
        "print('returned')\n"
    )
    env = {**_env(), "PYTHONPATH": str(ROOT), distributed.TIMEOUT_VARIABLE: "2"}
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.splitlines()
    waited = re.fullmatch(r"stall\.py: error: rank 0 waited (\d+) s for the other ranks: a rank stopped or hung\?", line)
    assert waited and 2 <= int(waited[1]) < 60, line  # the limit, give or take the timer's lateness
    assert result.stdout == ""


def test_the_limit_is_10_minutes_or_10_times_the_longest_round(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_VARIABLE, raising=False)
    group = distributed.Group()
    assert group.timeout() == 600
    group.longest = 100.0  # a batch (or a model load) took 100 s between two collectives
    assert group.timeout() == 1000
    monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, "7.5")
    assert distributed.Group().timeout() == 7.5


@pytest.mark.parametrize("value", ["soon", "0", "-3", "nan", "inf"])
def test_a_bad_timeout_variable_is_one_line_exit_2(tmp_path, value):
    script = tmp_path / "join.py"
    script.write_text("from stable_diffusion import distributed\ndistributed.Group()\n")
    env = {**_env(), "PYTHONPATH": str(ROOT), distributed.TIMEOUT_VARIABLE: value}
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"join.py: error: SD_MLX_COLLECTIVE_TIMEOUT={value!r} is not a positive number of seconds; set it to one or unset it"]


def test_ctrl_c_mid_job_exits_130_and_resume_finishes_it(tiny_sd1, job_folder, single_slow):
    out = job_folder / "ctrl_c" / "img.png"
    out.parent.mkdir()
    command = [sys.executable, T2I, "--prompts", job_folder / "prompts.txt", "--model", tiny_sd1, *SLOW_JOB, "-o", out]
    process = subprocess.Popen(
        [str(c) for c in command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=job_folder,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal's Ctrl-C, not an inherited ignore
    )
    try:
        deadline = time.time() + 300
        while not list(out.parent.glob("img_*.png")) and time.time() < deadline and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "images are written; run the same command with --resume to finish" in stderr
    done = sorted(p.name for p in out.parent.glob("img_*.png"))
    assert 0 < len(done) < N_IMAGES and not list(out.parent.glob(".*.part"))
    ok(run([*command, "--resume"], job_folder))
    for name in files(out.parent):
        assert np.array_equal(pixels(out.parent / name), pixels(single_slow.parent / name)), name
    assert len(files(out.parent)) == N_IMAGES


def test_resume_of_a_finished_job_writes_nothing(tiny_sd1, job_folder, single):
    before = {p.name: p.stat().st_mtime_ns for p in single.parent.iterdir()}
    result = ok(run([sys.executable, T2I, "--prompts", job_folder / "prompts.txt", "--model", tiny_sd1, *JOB, "-o", single.with_name("img.png"), "--resume"], job_folder))
    assert f"--resume: {N_IMAGES} of {N_IMAGES} images already written" in result.stdout
    assert {p.name: p.stat().st_mtime_ns for p in single.parent.iterdir()} == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["p", "--seeds", "1-3", "--seed", 4], "give --seed or --seeds, not both"),
        (["p", "--seeds", "1-3", "--n_images", 2], "leave --n_images at 1"),
        (["p", "--seeds", "5-1"], "the range '5-1' is empty"),
        (["p", "--seeds", "18446744073709551616"], "seeds must be in [0, 2**64)"),
        (["p", "--seeds", "0-100000000"], "lists 100000001 seeds; a job makes at most 1000000 images"),
        (["p", "--resume"], "--resume skips the files"),
        (["--n_images", 2], "give a prompt or --prompts FILE"),
        (["p", "--prompts", "prompts.txt"], "not both"),
        (["--prompts", "missing.txt"], "--prompts file 'missing.txt' does not exist"),
        (["p", "--seeds", "1-3", "--grid", "--n_rows", 2], "--n_rows 2 does not divide the 3 images of the grid"),
    ],
)
def test_bad_batch_flags_are_one_line_exit_2(tiny_sd1, job_folder, tmp_path, args, message):
    result = run([sys.executable, T2I, *args, "--model", tiny_sd1, "--steps", 1, "-o", tmp_path / "o.png"], job_folder)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and message in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_image2image_input_list_two_ranks_write_the_files_of_one_process(tiny_sd2, tmp_path):
    rng = np.random.default_rng(1)
    for name, (h, w) in (("a.png", (32, 32)), ("b.png", (40, 28))):  # two sizes: one batch per input
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "inputs.txt").write_text("a.png\nb.png\n")
    args = ["--images", "inputs.txt", "a lit fireplace", "--model", tiny_sd2, "--seeds", "1-2", "--strength", 0.5, "--steps", 4, "--batch_size", 1, "--no-float16"]
    i2i = str(ROOT / "image2image.py")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    ok(run([sys.executable, i2i, *args, "-o", "one/out.png"], tmp_path))
    ok(run(launch_command(2, i2i, *args, "-o", "two/out.png"), tmp_path))
    assert files(tmp_path / "one") == files(tmp_path / "two") == ["out_1.png", "out_2.png", "out_3.png", "out_4.png"]
    for name in files(tmp_path / "one"):
        assert np.array_equal(pixels(tmp_path / "one" / name), pixels(tmp_path / "two" / name)), name
    assert pixels(tmp_path / "one" / "out_3.png").shape == (40, 28, 3)
    p = images.parse_parameters(images.read_parameters(tmp_path / "one" / "out_4.png"))
    assert (p["Prompt"], p["Seed"], p["Denoising strength"], p["Size"]) == ("a lit fireplace", "2", "0.5", "28x40")
