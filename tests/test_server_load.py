"""The server under load (issue 22): many clients at once, /interrupt, kill -9, clients that leave.

Each test starts ``python -m stable_diffusion.server`` on the tiny SD 1.x model (``serve``, loopback,
a free port) and talks to it over HTTP as AUTOMATIC1111's clients do. What it is held to:

- AUTOMATIC1111's API: ``/sdapi/v1/progress`` reports the running job's ``sampling_steps`` and
  ``sampling_step``; ``/interrupt`` ends the running job, which answers what it has; ``save_images``
  numbers each saved picture ``NNNNN-SEED.png`` in the order written; ``info`` is ``Processed.js()``
  with ``all_seeds`` and ``infotexts``.
- The library: a request's picture equals, pixel for pixel, what ``load_model(...).generate_latents``
  and ``decode`` give in this process for the same prompt, seed, sampler, steps, guidance and size.
- The files: with ``--save-images``, a picture the server answered is on disk, complete, with its
  parameters, whatever instant the server is killed (``images.save_image`` writes a temporary file
  and renames it).
"""

import base64
import http.client
import io
import itertools
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from server_process import serve

from stable_diffusion import images, load_model

# Every request names all that sets its picture, so the reference call below needs no server default.
SETTINGS = {"sampler_name": "Euler", "scheduler": "Automatic", "cfg_scale": 7.0, "width": 32, "height": 32, "negative_prompt": "blurry"}
QUICK_STEPS = 2
LONG_STEPS = 400  # ~20 s of steps on the tiny model: a job that is still running when it is stopped
TIMEOUT = 120  # seconds any one request may take on a loaded 2-core machine
SEND_GAP = 0.1  # seconds between two requests meant to arrive in order


# ---------------------------------------------------------------------------------------------
# Talking to the server


def body(prompt: str, seed: int, steps: int = QUICK_STEPS, **extra) -> dict:
    return {**SETTINGS, "prompt": prompt, "seed": seed, "steps": steps, **extra}


def txt2img(url: str, request: dict) -> dict:
    response = httpx.post(url + "/sdapi/v1/txt2img", json=request, timeout=TIMEOUT)
    assert response.status_code == 200, response.text[:500]
    return response.json()


def progress(url: str) -> dict:
    response = httpx.get(url + "/sdapi/v1/progress", params={"skip_current_image": "true"}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text[:500]
    return response.json()


def running_steps(url: str) -> int:
    """The steps of the running job as /progress reports them (A1111's state.sampling_steps); 0 when idle."""
    state = progress(url)["state"]
    return state["sampling_steps"] if state["job_count"] else 0


def wait_for(condition, what: str, timeout: float = TIMEOUT, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def picture(answer: dict, k: int = 0) -> tuple[np.ndarray, str]:
    """The answer's k-th picture as (H, W, 3) uint8 and its PNG parameters chunk."""
    image = Image.open(io.BytesIO(base64.b64decode(answer["images"][k])))
    image.load()
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB")), image.info.get("parameters")


class Call(threading.Thread):
    """One txt2img request on its own thread; ``answer`` or ``error`` once it is done."""

    def __init__(self, url: str, request: dict):
        super().__init__(daemon=True)
        self.url, self.request = url, request
        self.answer = self.error = None
        self.done_at = None

    def run(self):
        try:
            self.answer = txt2img(self.url, self.request)
        except BaseException as e:  # re-raised by result() in the test's thread
            self.error = e
        self.done_at = time.monotonic()

    def result(self, timeout: float = TIMEOUT) -> dict:
        self.join(timeout)
        assert not self.is_alive(), f"the request of seed {self.request['seed']} did not end in {timeout} s"
        if self.error is not None:
            raise self.error
        return self.answer


class Sent(Call):
    """A txt2img request whose bytes are all sent before the constructor returns; a thread reads the answer.

    Sending in the caller's thread fixes the order requests reach the server: a client thread of its
    own (connection set-up, an httpx client) can be late by more than the gap between two sends.
    """

    def __init__(self, url: str, request: dict):
        super().__init__(url, request)
        split = urlsplit(url)
        self.connection = http.client.HTTPConnection(split.hostname, split.port, timeout=TIMEOUT)
        self.connection.request("POST", "/sdapi/v1/txt2img", body=json.dumps(request), headers={"Content-Type": "application/json"})
        self.start()

    def run(self):
        try:
            response = self.connection.getresponse()
            text = response.read().decode()
            assert response.status == 200, text[:500]
            self.answer = json.loads(text)
        except BaseException as e:  # re-raised by result() in the test's thread
            self.error = e
        finally:
            self.connection.close()
        self.done_at = time.monotonic()


def send_behind(url: str, request: dict) -> Call:
    """Send a request while another job runs; it waits in the queue behind it.

    A1111 v1.9 shows a queued job only through /internal/progress and force_task_id, which this
    server does not have; a second is left for the request to reach the queue, and the checks
    below hold whether it arrived before the stop or just after it.
    """
    call = Call(url, request)
    call.start()
    time.sleep(1.0)
    return call


# ---------------------------------------------------------------------------------------------
# The reference: the library in this process


@pytest.fixture(scope="module")
def library(tiny_sd1):
    return load_model(str(tiny_sd1), sampler_rules="a1111")  # A1111 runs Euler through k-diffusion: its sigmas


def library_picture(sd, request: dict) -> np.ndarray:
    """What the library makes for an A1111 request: its prompt, negative, seed, sampler, steps, guidance and size."""
    f = sd.latent_factor
    for x in sd.generate_latents(
        request["prompt"],
        negative_text=request["negative_prompt"],
        num_steps=request["steps"],
        cfg_weight=request["cfg_scale"],
        latent_size=(request["height"] // f, request["width"] // f),
        seed=request["seed"],
        sampler=request["sampler_name"],
    ):
        mx.eval(x)
    return images.to_uint8(sd.decode(x))[0]


def check_answer(answer: dict, request: dict, reference: np.ndarray | None = None):
    """One picture of the request's size, the request's seed in ``info``, the infotext in the PNG; pixel-exact if a reference is given."""
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [request["seed"]] and info["seed"] == request["seed"]
    assert len(answer["images"]) == 1
    pixels, parameters = picture(answer)
    assert pixels.shape == (request["height"], request["width"], 3)
    assert parameters == info["infotexts"][0]
    assert f"Seed: {request['seed']}" in parameters
    if reference is not None:
        np.testing.assert_array_equal(pixels, reference)


# ---------------------------------------------------------------------------------------------
# The tests


@pytest.fixture(scope="module")
def server(tiny_sd1):
    with serve(tiny_sd1) as running:
        yield running


def test_fifty_concurrent_requests_complete_in_arrival_order_with_their_seeds(tiny_sd1, tmp_path, library):
    n = 50
    requests = [body(f"a photo of object number {i}", seed=1000 + 7 * i, save_images=True) for i in range(n)]
    requests[0]["steps"] = LONG_STEPS  # holds the queue while the others arrive; interrupted once they all wait
    out = tmp_path / "outputs"
    with serve(tiny_sd1, "--output-dir", out) as server:
        calls = [Call(server.url, requests[0])]
        calls[0].start()
        wait_for(lambda: running_steps(server.url) == LONG_STEPS, "the first job to start")
        for request in requests[1:]:
            calls.append(Sent(server.url, request))  # each one's bytes are sent before the next one's
            time.sleep(SEND_GAP)
        assert running_steps(server.url) == LONG_STEPS, "the first job ended before the others were sent"
        assert httpx.post(server.url + "/sdapi/v1/interrupt", timeout=TIMEOUT).status_code == 200
        answers = [call.result() for call in calls]

    for request, answer in zip(requests, answers):
        check_answer(answer, request)
    for k in (1, 2, 25, n - 1):
        check_answer(answers[k], requests[k], library_picture(library, requests[k]))
    # The order they ran in: A1111 numbers each saved picture (NNNNN-SEED.png) as it is written.
    finished, _ = files_under(out)
    numbered = sorted((int(path.name.split("-")[0]), text) for path, (_, text) in finished.items())
    seeds = [int(images.parse_parameters(text)["Seed"]) for _, text in numbered]
    assert seeds == [r["seed"] for r in requests], "the jobs did not run in the order they arrived"


def step_time(url: str) -> tuple[int, float]:
    """(the running job's step, seconds per step) from /progress over a few steps: what one step takes here, now."""
    s0, t0 = wait_for(lambda: (s := progress(url)["state"]["sampling_step"]) >= 1 and (s, time.monotonic()), "a step")
    s1, t1 = wait_for(lambda: (s := progress(url)["state"]["sampling_step"]) >= s0 + 3 and (s, time.monotonic()), "three more steps")
    return s1, (t1 - t0) / (s1 - s0)


def stop_bound(step: int, seconds_per_step: float) -> float:
    """How soon a job stopped "at the next step" must end: a few steps and a poll; a quarter of what it had left at most."""
    bound = max(2.0, 10 * seconds_per_step)
    assert bound < (LONG_STEPS - step) * seconds_per_step / 4, "the long job is too short here to tell a stop from its end"
    return bound


def test_interrupt_ends_the_running_job_early_and_the_next_job_runs(server, library):
    long = body("a long job", seed=5, steps=LONG_STEPS)
    after = body("the job after", seed=6)
    first = Call(server.url, long)
    first.start()
    wait_for(lambda: running_steps(server.url) == LONG_STEPS, "the long job to start")
    second = send_behind(server.url, after)
    bound = stop_bound(*step_time(server.url))
    started = time.monotonic()
    assert httpx.post(server.url + "/sdapi/v1/interrupt", timeout=TIMEOUT).status_code == 200

    answer = first.result()
    elapsed = first.done_at - started
    # A1111 answers what it has when interrupted: the picture of the steps made, with its seed and infotext.
    check_answer(answer, long)
    assert elapsed < bound, f"the interrupted job answered {elapsed:.1f} s after /interrupt"
    # The interrupt was the running job's alone: the next one runs all its steps.
    check_answer(second.result(), after, library_picture(library, after))
    wait_for(lambda: running_steps(server.url) == 0, "the server to be idle")


def test_a_client_that_leaves_cancels_its_job_at_the_next_step(server, library):
    split = urlsplit(server.url)
    connection = http.client.HTTPConnection(split.hostname, split.port, timeout=TIMEOUT)
    payload = json.dumps(body("nobody waits for this", seed=8, steps=LONG_STEPS))
    connection.request("POST", "/sdapi/v1/txt2img", body=payload, headers={"Content-Type": "application/json"})
    wait_for(lambda: running_steps(server.url) == LONG_STEPS, "the abandoned job to start")
    after = body("the job after the client left", seed=9)
    second = send_behind(server.url, after)
    bound = stop_bound(*step_time(server.url))
    left = time.monotonic()
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()

    wait_for(lambda: running_steps(server.url) != LONG_STEPS, "the abandoned job to end")
    ended = time.monotonic() - left
    assert ended < bound, f"the abandoned job ran {ended:.1f} s after its client left"
    check_answer(second.result(), after, library_picture(library, after))
    wait_for(lambda: running_steps(server.url) == 0, "the server to be idle")


def files_under(folder: Path) -> tuple[dict, list]:
    """({path: (pixels, parameters)} of every finished file, [temporary .part files]) under ``folder``, recursively.

    A finished file must decode to the end: a truncated PNG fails ``load()``.
    """
    finished, parts = {}, []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.endswith(".part"):
            parts.append(path)
            continue
        with Image.open(path) as image:
            image.load()
            finished[path] = (np.asarray(image.convert("RGB")), image.info.get("parameters"))
    return finished, parts


def test_kill_9_during_a_job_loses_no_answered_picture_and_leaves_no_partial_file(tiny_sd1, tmp_path):
    out = tmp_path / "outputs"
    answered = []  # (request, pixels, parameters) of each answer that came back
    with serve(tiny_sd1, "--save-images", "--output-dir", out) as running:

        def client():
            try:
                for i in range(10**6):
                    request = body(f"kept picture {i}", seed=300 + i, steps=3, save_images=True)
                    answer = txt2img(running.url, request)
                    check_answer(answer, request)
                    answered.append((request, *picture(answer)))
                    times.append(time.monotonic())
            except httpx.TransportError:  # the server died during this request: it answered nothing
                pass
            except BaseException as e:
                errors.append(e)

        times, errors = [], []
        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        wait_for(lambda: len(answered) >= 4 or not thread.is_alive(), "four answers")
        if errors:
            raise errors[0]
        assert thread.is_alive(), running.log()
        # Kill at the worst instant: while the next picture is being written (its .part file exists).
        # The folders are watched in a tight loop (a PNG of this size is written in a few ms); if no
        # write is caught within a few jobs' time, the kill lands at that random instant instead.
        folders = {path.parent for path in out.rglob("*.png")}
        deadline = time.monotonic() + 3 * max(b - a for a, b in itertools.pairwise(times))
        caught_writing = False
        while time.monotonic() < deadline and not caught_writing:
            caught_writing = any(entry.name.endswith(".part") for folder in folders for entry in os.scandir(folder))
        os.kill(running.process.pid, signal.SIGKILL)
        running.process.wait()
        thread.join(TIMEOUT)
    assert not errors, errors
    moment = "while a picture was written" if caught_writing else "at a random instant"

    finished, _ = files_under(out)
    pictures = list(finished.values())
    for request, pixels, parameters in answered:
        assert any(np.array_equal(pixels, p) and parameters == text for p, text in pictures), f"answered seed {request['seed']} is not on disk (killed {moment})"
    assert all(text is not None for _, text in pictures), "a saved picture has no parameters chunk"
    assert len(answered) <= len(finished) <= len(answered) + 1  # at most the job killed after its file was written

    # A new server on the same folder clears what the killed one left half-written, and keeps the rest.
    with serve(tiny_sd1, "--save-images", "--output-dir", out) as again:
        request = body("after the restart", seed=77, steps=2, save_images=True)
        check_answer(txt2img(again.url, request), request)
    after, parts_after = files_under(out)
    assert parts_after == [], f"half-written files left under the output folder (killed {moment}): {parts_after}"
    assert len(after) == len(finished) + 1
    for path, (pixels, text) in finished.items():
        assert np.array_equal(after[path][0], pixels) and after[path][1] == text
