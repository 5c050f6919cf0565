"""The server against A1111's API as real clients speak it, and against the library called directly.

A client no one here wrote drives it: ``webuiapi`` (the registry's A1111 Python client), plus the
exact request bodies Open WebUI and SillyTavern send (tests/server_fixtures, each naming its source).
Every picture the server returns is compared pixel for pixel with what the library makes with the
same settings (``load_model(...).generate_latents`` + ``decode``): the server adds no second pipeline.
"""

import base64
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image
from server_process import serve

from stable_diffusion import images, inpaint, load_model

FIXTURES = Path(__file__).parent / "server_fixtures"
PROMPT, NEGATIVE = "a red cube on a table", "blurry"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_sd2, tiny_sd1_inpaint):
    folder = tmp_path_factory.mktemp("models")
    (folder / "other").symlink_to(tiny_sd2, target_is_directory=True)
    (folder / "inpaint").symlink_to(tiny_sd1_inpaint, target_is_directory=True)
    return folder


@pytest.fixture(scope="module")
def server(tiny_sd1, models_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    with serve(tiny_sd1, "--models-dir", models_dir, "--output-dir", out, "--preview-every", "1") as s:
        s.output_dir = out
        yield s


@pytest.fixture(scope="module")
def api(server):
    host, port = server.url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", scheduler="Automatic", steps=4)


_LIBRARY = {}


def library(path):
    """The library's own facade for a model folder, under A1111's sampler rules (k-diffusion's sigmas), as A1111
    runs its k-diffusion samplers; its timestep samplers (DDIM, PLMS, UniPC, LCM) are diffusers' classes (``rules_of``)."""
    if str(path) not in _LIBRARY:
        _LIBRARY[str(path)] = load_model(str(path), sampler_rules="a1111")
    return _LIBRARY[str(path)]


def last(generator):
    x = None
    for x in generator:
        pass
    return x


def pixels(picture) -> np.ndarray:
    return np.asarray(picture.convert("RGB"))


# The samplers A1111 runs with its own timestep code (modules/sd_samplers_timesteps.py), not k-diffusion's.
A1111_TIMESTEP_SAMPLERS = {"DDIM", "DDIM CFG++", "PLMS", "UniPC", "LCM"}


def rules_of(sampler_name: str) -> str:
    return "diffusers" if sampler_name in A1111_TIMESTEP_SAMPLERS else "a1111"


def library_txt2img(path, seed, **settings) -> np.ndarray:
    sd = library(path)
    x = last(sd.generate_latents(PROMPT, negative_text=NEGATIVE, seed=seed, latent_size=(16, 16), **settings))
    return images.to_uint8(sd.decode(x))[0]


def set_model(server, title):
    requests.post(server.url + "/sdapi/v1/options", json={"sd_model_checkpoint": title}, timeout=300).raise_for_status()


def test_webuiapi_txt2img_equals_the_library(server, api, tiny_sd1):
    """batch_size 2 x n_iter 2 with a fixed seed: image k is the library's seed + k image, pixel for pixel;
    info carries A1111's fields and each PNG its infotext."""
    set_model(server, Path(tiny_sd1).name)
    result = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=1000, steps=4, cfg_scale=6.5, width=64, height=64, sampler_name="Euler", batch_size=2, n_iter=2)
    assert len(result.images) == 4
    assert result.info["all_seeds"] == [1000, 1001, 1002, 1003]
    assert result.info["seed"] == 1000 and result.info["sampler_name"] == "Euler" and result.info["steps"] == 4
    for k, picture in enumerate(result.images):
        expected = library_txt2img(tiny_sd1, 1000 + k, num_steps=4, cfg_weight=6.5, sampler="Euler")
        np.testing.assert_array_equal(pixels(picture), expected)
        text = picture.info["parameters"]
        assert text == result.info["infotexts"][k]
        parsed = images.parse_parameters(text)
        assert parsed["Prompt"] == PROMPT and parsed["Negative prompt"] == NEGATIVE
        assert parsed["Seed"] == str(1000 + k) and parsed["Steps"] == "4" and parsed["Sampler"] == "Euler"
        assert parsed["CFG scale"] == "6.5" and parsed["Size"] == "64x64"


def test_infotext_is_a1111s_format(server, api, tiny_sd1):
    """The parameters text reads as A1111 writes it: prompt, 'Negative prompt: ...', then 'Key: value' pairs in A1111's order."""
    set_model(server, Path(tiny_sd1).name)
    result = api.txt2img(prompt="a, b: c", negative_prompt="", seed=7, steps=2, width=64, height=64, sampler_name="DPM++ 2M", scheduler="Karras")
    text = result.images[0].info["parameters"]
    prompt, params = text.split("\n")
    assert prompt == "a, b: c"  # no negative prompt line when it is empty (A1111)
    keys = [pair.split(": ")[0] for pair in params.split(", ")]
    assert keys == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model"]
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in params


def test_seed_minus_one_draws_and_reports_it(server, api, tiny_sd1):
    set_model(server, Path(tiny_sd1).name)
    result = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=-1, steps=2, width=64, height=64, batch_size=2)
    seed = result.info["seed"]
    assert seed >= 0 and result.info["all_seeds"] == [seed, seed + 1]
    np.testing.assert_array_equal(pixels(result.images[1]), library_txt2img(tiny_sd1, seed + 1, num_steps=2, cfg_weight=7.0, sampler="Euler"))


def test_img2img_equals_the_library(server, api, tiny_sd1):
    set_model(server, Path(tiny_sd1).name)
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    result = api.img2img(images=[init], prompt=PROMPT, negative_prompt=NEGATIVE, seed=5, steps=6, denoising_strength=0.5, width=64, height=64, sampler_name="Euler a")
    sd = library(tiny_sd1)
    x = last(sd.generate_latents_from_image(images.to_model_input(init), PROMPT, negative_text=NEGATIVE, strength=0.5, num_steps=6, cfg_weight=7.0, seed=5, sampler="Euler a"))
    np.testing.assert_array_equal(pixels(result.images[0]), images.to_uint8(sd.decode(x))[0])
    assert images.parse_parameters(result.images[0].info["parameters"])["Denoising strength"] == "0.5"


def _mask() -> Image.Image:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:40, 20:44] = 255
    return Image.fromarray(mask, "L")


@pytest.mark.parametrize("full_res", [False, True])
def test_inpaint_equals_the_library(server, api, tiny_sd1_inpaint, full_res):
    """Inpainting on the 9-channel tiny model (switched to by override_settings): the whole picture, and
    "only masked" (inpaint_full_res, padding 8) through inpaint.crop_to_mask and its paste."""
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = _mask()
    result = api.img2img(
        images=[init], mask_image=mask, mask_blur=4, inpaint_full_res=full_res, inpaint_full_res_padding=8, prompt=PROMPT, negative_prompt=NEGATIVE,
        seed=9, steps=4, denoising_strength=1.0, width=64, height=64, sampler_name="Euler", override_settings={"sd_model_checkpoint": "inpaint"},
    )
    sd = library(tiny_sd1_inpaint)
    common = dict(negative_text=NEGATIVE, strength=1.0, num_steps=4, cfg_weight=7.0, seed=9, sampler="Euler")
    if full_res:
        crop = inpaint.crop_to_mask(init, mask, 8, 64, 64, blur=4, multiple=sd.latent_factor)
        x = last(sd.generate_latents_from_image(images.to_model_input(crop.image), PROMPT, mask=crop.mask, **common))
        expected = pixels(crop.paste(np.asarray(sd.decode(x)))[0])
    else:
        x = last(sd.generate_latents_from_image(images.to_model_input(init), PROMPT, mask=mask, mask_blur=4, **common))
        expected = images.to_uint8(sd.decode(x))[0]
    np.testing.assert_array_equal(pixels(result.images[0]), expected)
    parsed = images.parse_parameters(result.images[0].info["parameters"])
    assert parsed["Mask blur"] == "4" and parsed["Model"] == "inpaint"
    assert ("Inpaint area" in parsed) == full_res
    assert result.info["is_using_inpainting_conditioning"] is True
    assert result.info["extra_generation_params"]["Mask blur"] == 4
    assert requests.get(api.baseurl + "/options", timeout=10).json()["sd_model_checkpoint"] != "inpaint"  # restored afterwards


def test_options_model_switch(server, api, tiny_sd1, tiny_sd2):
    """POST options sd_model_checkpoint loads another model (one of --models-dir); txt2img then runs it."""
    titles = [m["title"] for m in requests.get(api.baseurl + "/sd-models", timeout=10).json()]
    assert titles[0] == Path(tiny_sd1).name and "other" in titles and "inpaint" in titles
    options = api.get_options()
    assert options["sd_model_checkpoint"] == Path(tiny_sd1).name
    api.set_options({"sd_model_checkpoint": "other"})
    assert api.get_options()["sd_model_checkpoint"] == "other"
    result = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=3, steps=3, width=64, height=64, sampler_name="Euler")
    np.testing.assert_array_equal(pixels(result.images[0]), library_txt2img(tiny_sd2, 3, num_steps=3, cfg_weight=7.0, sampler="Euler"))
    assert result.info["sd_model_name"] == "other"
    api.set_options({"sd_model_checkpoint": Path(tiny_sd1).name})
    r = requests.post(api.baseurl + "/options", json={"sd_model_checkpoint": "no-such-model"}, timeout=10)
    assert r.status_code == 404 and "no-such-model" in r.json()["detail"]


def test_clip_skip_from_override_settings(server, api, tiny_sd1):
    set_model(server, Path(tiny_sd1).name)
    result = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=11, steps=2, width=64, height=64, sampler_name="Euler", override_settings={"CLIP_stop_at_last_layers": 2})
    np.testing.assert_array_equal(pixels(result.images[0]), library_txt2img(tiny_sd1, 11, num_steps=2, cfg_weight=7.0, sampler="Euler", clip_skip=2))
    assert images.parse_parameters(result.images[0].info["parameters"])["Clip skip"] == "2"


def test_clip_skip_option_sent_as_a_string_is_stored_as_a_number(server, api, tiny_sd1):
    """A1111's options accept "2" for CLIP_stop_at_last_layers; later generations use clip skip 2."""
    set_model(server, Path(tiny_sd1).name)
    requests.post(server.url + "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": "2"}, timeout=10).raise_for_status()
    try:
        result = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=12, steps=2, width=64, height=64, sampler_name="Euler")
    finally:
        requests.post(server.url + "/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1}, timeout=10).raise_for_status()
    np.testing.assert_array_equal(pixels(result.images[0]), library_txt2img(tiny_sd1, 12, num_steps=2, cfg_weight=7.0, sampler="Euler", clip_skip=2))


@pytest.mark.parametrize("name", ["open_webui_txt2img.json", "sillytavern_txt2img.json", "sillytavern_txt2img_current.json"])
def test_client_request_bodies(server, tiny_sd1, name):
    """The exact bodies Open WebUI and SillyTavern POST; SillyTavern asks save_images, which writes into --output-dir only."""
    set_model(server, Path(tiny_sd1).name)
    body = json.loads((FIXTURES / name).read_text())["body"]
    before = set(server.output_dir.rglob("*.png"))
    r = requests.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=300)
    assert r.status_code == 200, r.text
    answer = r.json()
    info = json.loads(answer["info"])
    assert len(answer["images"]) == body.get("batch_size", 1) == len(info["all_seeds"])
    picture = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
    seed = info["all_seeds"][0]
    if "seed" in body:
        assert seed == body["seed"]
    sampler = body["sampler_name"]
    schedule = None if sampler == "DDIM" else body.get("scheduler")
    settings = dict(num_steps=body["steps"], cfg_weight=body["cfg_scale"], sampler=sampler, schedule=schedule, sampler_rules=rules_of(sampler))
    sd = library(tiny_sd1)
    x = last(sd.generate_latents(body["prompt"], negative_text=body["negative_prompt"], seed=seed, latent_size=(16, 16), **settings))
    np.testing.assert_array_equal(pixels(picture), images.to_uint8(sd.decode(x))[0])
    written = set(server.output_dir.rglob("*.png")) - before
    assert len(written) == (len(answer["images"]) if body.get("save_images") else 0)
    for path in written:
        assert images.read_parameters(path) in info["infotexts"]


def _post_async(url, body, result):
    def run():
        result["response"] = requests.post(url, json=body, timeout=600)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait_for(url, condition, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = requests.get(url + "/sdapi/v1/progress", timeout=10).json()
        if condition(progress):
            return progress
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting on /progress (last: {progress['state']})")


def test_progress_previews_and_interrupt(server, api, tiny_sd1):
    """While a job runs /progress answers with A1111's formula and a preview; /interrupt ends it at the next
    step with the picture of the latest latent, as A1111 does; the server is then idle."""
    set_model(server, Path(tiny_sd1).name)
    result = {}
    thread = _post_async(server.url + "/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 400, "width": 64, "height": 64, "n_iter": 2, "seed": 1}, result)
    progress = _wait_for(server.url, lambda p: p["state"]["sampling_step"] >= 2)
    state = progress["state"]
    assert state["job_count"] == 2 and state["sampling_steps"] == 400 and state["job_no"] == 0
    expected = 0.01 + state["job_no"] / 2 + state["sampling_step"] / 400 / 2  # A1111's formula, read at the same instant
    assert progress["progress"] == pytest.approx(expected)
    assert progress["eta_relative"] > 0
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert preview.size == (64, 64)
    skipped = requests.get(server.url + "/sdapi/v1/progress", params={"skip_current_image": "true"}, timeout=10).json()
    assert skipped["current_image"] is None
    assert api.interrupt() == {}
    thread.join(120)
    assert not thread.is_alive()
    answer = result["response"].json()
    assert len(answer["images"]) == 1  # the first batch ends early, the second never starts
    idle = requests.get(server.url + "/sdapi/v1/progress", timeout=10).json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_show_progress_every_n_steps_option_sets_the_previews(server, api, tiny_sd1):
    """A1111's option (0: no previews) overrides --preview-every until set again."""
    set_model(server, Path(tiny_sd1).name)
    api.set_options({"show_progress_every_n_steps": 0})
    try:
        result = {}
        thread = _post_async(server.url + "/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 400, "width": 64, "height": 64, "seed": 1}, result)
        progress = _wait_for(server.url, lambda p: p["state"]["sampling_step"] >= 3)
        assert progress["current_image"] is None
        api.interrupt()
        thread.join(120)
        assert not thread.is_alive()
    finally:
        api.set_options({"show_progress_every_n_steps": 1})


def test_disconnected_client_cancels_its_job(server, tiny_sd1):
    set_model(server, Path(tiny_sd1).name)
    body = json.dumps({"prompt": PROMPT, "steps": 1000, "width": 64, "height": 64}).encode()
    import socket

    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    _wait_for(server.url, lambda p: p["state"]["sampling_step"] >= 1)
    sock.close()
    progress = _wait_for(server.url, lambda p: p["state"]["job_count"] == 0, timeout=30)
    assert progress["progress"] == 0
    started = time.monotonic()
    r = requests.post(server.url + "/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "width": 64, "height": 64}, timeout=120)
    assert r.status_code == 200 and time.monotonic() - started < 60


def test_jobs_run_one_at_a_time_in_order(server, tiny_sd1):
    """Three requests sent at once: each answers with its own seed's picture, and they finish in the order sent."""
    set_model(server, Path(tiny_sd1).name)
    results, threads, finished = [{} for _ in range(3)], [], []
    for k in range(3):
        def run(k=k):
            results[k]["r"] = requests.post(server.url + "/sdapi/v1/txt2img", json={"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 50 + k, "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler"}, timeout=300)
            finished.append(k)

        threads.append(threading.Thread(target=run))
        threads[-1].start()
        time.sleep(0.3)  # the order they reach the queue
    for thread in threads:
        thread.join(300)
    assert finished == [0, 1, 2]
    for k, result in enumerate(results):
        picture = Image.open(io.BytesIO(base64.b64decode(result["r"].json()["images"][0])))
        np.testing.assert_array_equal(pixels(picture), library_txt2img(tiny_sd1, 50 + k, num_steps=3, cfg_weight=7.0, sampler="Euler"))


def test_lists(server, api):
    samplers = requests.get(api.baseurl + "/samplers", timeout=10).json()
    names = [s["name"] for s in samplers]
    assert "Euler a" in names and "DPM++ 2M" in names and "DDIM" in names
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    schedulers = requests.get(api.baseurl + "/schedulers", timeout=10).json()
    assert {"name": "karras", "label": "Karras"}.items() <= schedulers[2].items()
    for route, empty in (("upscalers", []), ("latent-upscale-modes", []), ("sd-vae", []), ("loras", []), ("embeddings", {"loaded": {}, "skipped": {}})):
        assert requests.get(f"{api.baseurl}/{route}", timeout=10).json() == empty
    assert requests.post(api.baseurl + "/refresh-checkpoints", timeout=10).status_code == 200


def test_png_info_reads_the_parameters_back(server, api, tiny_sd1):
    set_model(server, Path(tiny_sd1).name)
    result = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=21, steps=2, width=64, height=64)
    info = api.png_info(result.images[0])
    assert info.info == result.info["infotexts"][0]
    assert info.parameters["Seed"] == "21" and info.parameters["Prompt"] == PROMPT


def test_skip_ends_the_batch_and_goes_on(server, api, tiny_sd1):
    """/skip ends the running batch (its picture from the latest latent) and the job goes on with the next (A1111's skip)."""
    set_model(server, Path(tiny_sd1).name)
    result = {}
    thread = _post_async(server.url + "/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 400, "width": 64, "height": 64, "n_iter": 2, "seed": 1}, result)
    _wait_for(server.url, lambda p: p["state"]["sampling_step"] >= 2)
    assert requests.post(server.url + "/sdapi/v1/skip", timeout=10).json() == {}
    progress = _wait_for(server.url, lambda p: p["state"]["job_no"] == 1 and p["state"]["sampling_step"] >= 1)
    assert progress["state"]["skipped"] is False and progress["progress"] > 0.5
    api.interrupt()
    thread.join(120)
    answer = result["response"].json()
    assert len(answer["images"]) == 2 and json.loads(answer["info"])["all_seeds"] == [1, 2]
