"""The facade from several threads (issue 23.5): a server loads a model once and generates off its main thread.

Since mlx 0.31.2 an array built on one thread's default stream cannot be evaluated on another
("There is no Stream(cpu, 0) in current thread"). The facade builds its arrays on a stream any thread
may use and lets one thread at a time run a step; LoRA changes wait for no one: they are refused
while a generation runs. Each result is compared with the same call made in one thread, bit for bit
(the same operations on the same inputs in the same order).
"""

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from stable_diffusion import StableDiffusion

ROOT = Path(__file__).resolve().parents[1]
CALL = dict(num_steps=3, cfg_weight=5.0, latent_size=(8, 8))


def generate(sd, prompt="a red house", seed=0):
    """The last latent and its decoded picture, as numpy (evaluated in the calling thread)."""
    x = list(sd.generate_latents(prompt, seed=seed, **CALL))[-1]
    image = sd.decode(x)
    mx.eval(image)
    return np.array(x), np.array(image)


def in_thread(fn, *args):
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn, *args).result(timeout=300)


@pytest.fixture(scope="module")
def reference(tiny_sd1):
    """Load, generate and decode in this one thread."""
    return {seed: generate(StableDiffusion(str(tiny_sd1)), seed=seed) for seed in (0, 1)}


def assert_same(ours, ref):
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


def test_a_model_loaded_in_one_thread_generates_in_another(tiny_sd1, reference):
    sd = in_thread(StableDiffusion, str(tiny_sd1))
    assert_same(in_thread(generate, sd), reference[0])
    assert_same(generate(sd, seed=1), reference[1])  # and back in the main thread


def test_a_model_loaded_in_the_main_thread_generates_in_a_worker(tiny_sd1, reference):
    sd = StableDiffusion(str(tiny_sd1))
    assert_same(in_thread(generate, sd), reference[0])


def test_two_threads_generating_on_one_fresh_facade_both_get_their_own_result(tiny_sd1, reference):
    sd = StableDiffusion(str(tiny_sd1))  # nothing read or fused yet: both threads meet the first use
    start = threading.Barrier(2)

    def run(seed):
        start.wait(timeout=60)
        return generate(sd, seed=seed)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = [pool.submit(run, seed) for seed in (0, 1)]
        for seed, result in zip((0, 1), results):
            assert_same(result.result(timeout=300), reference[seed])


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_file({f"{name}.lora_down.weight": rng.standard_normal((4, 32)).astype(np.float32), f"{name}.lora_up.weight": rng.standard_normal((32, 4)).astype(np.float32)}, str(path))
    return path


def test_lora_changes_while_another_thread_generates_are_refused(tiny_sd1, reference, lora_file):
    sd = StableDiffusion(str(tiny_sd1))
    first_step, go_on = threading.Event(), threading.Event()

    def run():
        steps = sd.generate_latents("a red house", seed=0, **CALL)
        x = next(steps)
        first_step.set()
        go_on.wait(timeout=120)
        for x in steps:
            pass
        return np.array(x)

    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(run)
        while not first_step.wait(timeout=0.1):
            assert not running.done(), running.result()  # the generation failed before its first step
        try:
            for change in (lambda: sd.load_lora(lora_file), sd.unload_loras, sd.quantize):
                with pytest.raises(ValueError, match=r"a generation is running on this model \(in another thread or an unfinished generator\)") as info:
                    change()
                assert "\n" not in str(info.value)
        finally:
            go_on.set()
        np.testing.assert_array_equal(running.result(timeout=300), reference[0][0])  # no LoRA merged mid-way
    sd.load_lora(lora_file)  # the generation is over: allowed again
    assert sd.loras == [(str(lora_file), 1.0)]


def test_an_abandoned_generator_no_longer_blocks_lora_changes(tiny_sd1, lora_file):
    sd = StableDiffusion(str(tiny_sd1))
    steps = sd.generate_latents("p", seed=0, **CALL)
    next(steps)
    with pytest.raises(ValueError, match="a generation is running"):
        sd.load_lora(lora_file)
    steps.close()
    sd.load_lora(lora_file)


def test_a_process_that_generated_in_a_finished_thread_exits_cleanly(tiny_sd1):
    # mlx 0.32.4 aborts at exit when streams of a finished thread that ran compiled functions remain.
    code = f"""
import threading
from stable_diffusion import StableDiffusion
sd = StableDiffusion({str(tiny_sd1)!r})
worker = threading.Thread(target=lambda: list(sd.generate_latents("p", num_steps=1, latent_size=(4, 4), seed=0)))
worker.start()
worker.join()
print("generated")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert (out.returncode, out.stdout.strip()) == (0, "generated"), out.stderr
    assert "terminate called" not in out.stderr


@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_a_generator_made_in_one_thread_steps_in_another(tiny_sd1, img2img):
    """The scripts make the generator in the main thread and step it in a worker (Ctrl-C stays
    responsive): its initial latent, conditioning and step-noise keys must not be left as arrays
    only the making thread could evaluate. Euler a draws noise every step."""
    sd = StableDiffusion(str(tiny_sd1), sampler="euler_a")
    image = np.random.default_rng(0).uniform(-1, 1, (64, 64, 3)).astype(np.float32)

    def make():
        if img2img:
            return sd.generate_latents_from_image(image, "a red house", strength=0.7, seed=3, num_steps=3, cfg_weight=5.0)
        return sd.generate_latents("a red house", seed=3, **CALL)

    reference = [np.array(x) for x in make()]
    steps = make()
    stepped = [np.array(in_thread(next, steps)) for _ in reference]
    for a, b in zip(stepped, reference):
        np.testing.assert_array_equal(a, b)
