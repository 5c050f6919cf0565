"""The server under bad and hostile requests: HTTP Basic auth on every path, a loopback default,
4xx answers of one line in A1111's {"error", "detail"} shape (never a 500, never a traceback),
names that cannot leave --models-dir / --lora-dir, nothing written, and a server that stays up."""

import base64
import io
import json

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image
from server_process import serve

from stable_diffusion.server import app as server_app
from stable_diffusion.server import generation


def _png(size=(64, 64), mode="RGB", value=128) -> str:
    with io.BytesIO() as out:
        Image.new(mode, size, value).save(out, format="PNG")
        return base64.b64encode(out.getvalue()).decode()


def _routes() -> set:
    """(method, path) of every route the application has, read from the application itself."""
    app = server_app.create_app(generation.Settings(model="sd-1.5"))
    found = set()
    for route in app.routes:
        for method in getattr(route, "methods", None) or {"GET"}:
            if method != "HEAD":
                found.add((method, route.path))
    return found


# Paths beyond the routes: the page's files, traversal attempts, unknown paths.
EXTRA = {("GET", "/static/index.html"), ("GET", "/static/../../etc/passwd"), ("GET", "/nope"), ("POST", "/sdapi/v1/nope"), ("GET", "/docs")}


@pytest.fixture(scope="module")
def auth_server(tiny_sd1, tmp_path_factory):
    with serve(tiny_sd1, "--api-auth", "alice:s3cret,bob:pässword", "--output-dir", tmp_path_factory.mktemp("out")) as s:
        yield s


def _paths():
    return sorted(_routes() | EXTRA)


@pytest.mark.parametrize("method,path", _paths())
def test_every_path_needs_the_credentials(auth_server, method, path):
    url = auth_server.url + path.replace("{path:path}", "index.html")
    for headers in ({}, {"Authorization": "Basic " + base64.b64encode(b"alice:wrong").decode()}, {"Authorization": "Basic !!!"}, {"Authorization": "Bearer s3cret"},
                    {"Authorization": "Basic " + base64.b64encode(b"mallory:s3cret").decode()}):
        r = requests.request(method, url, headers=headers, json={}, timeout=30)
        assert r.status_code == 401, (method, path, headers, r.status_code)
        assert r.headers["WWW-Authenticate"] == "Basic"
        assert set(r.json()) == {"error", "detail"}


def test_the_right_credentials_pass(auth_server):
    for user, password in (("alice", "s3cret"), ("bob", "pässword")):
        r = requests.get(auth_server.url + "/sdapi/v1/options", auth=(user, password), timeout=30)
        assert r.status_code == 200
    host, port = auth_server.url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), username="alice", password="s3cret", sampler="Euler", steps=2)
    result = api.txt2img(prompt="a cat", seed=1, width=64, height=64)
    assert len(result.images) == 1 and result.info["all_seeds"] == [1]


def test_default_bind_is_loopback(auth_server):
    assert auth_server.url.startswith("http://127.0.0.1:")


def test_listen_binds_every_interface(tiny_sd1):
    with serve(tiny_sd1, "--listen") as s:
        assert s.url.startswith("http://0.0.0.0:")
        assert requests.get(s.url.replace("0.0.0.0", "127.0.0.1") + "/sdapi/v1/options", timeout=30).status_code == 200


@pytest.fixture(scope="module")
def hostile(tiny_sd1, tiny_sd2, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    for name in ("models", "loras", "out"):
        (root / name).mkdir()
    (root / "secret.safetensors").write_bytes(b"not for the server")  # next to --lora-dir, outside it
    with serve(tiny_sd1, "--models-dir", root / "models", "--lora-dir", root / "loras", "--output-dir", root / "out", "--max-pixels", 1024 * 1024) as s:
        s.root, s.other_model = root, tiny_sd2
        yield s


T2I, I2I = "/sdapi/v1/txt2img", "/sdapi/v1/img2img"
SMALL = {"width": 64, "height": 64, "steps": 2}


def _cases(other_model):
    return [
        ("POST", T2I, b"{not json", 422, "JSON"),
        ("POST", T2I, b"[1, 2]", 422, "object"),
        ("POST", T2I, b'"text"', 422, "object"),
        ("POST", T2I, {"steps": "abc"}, 422, "steps"),
        ("POST", T2I, {"width": [64]}, 422, "width"),
        ("POST", T2I, {"prompt": 5}, 422, "prompt"),
        ("POST", T2I, {"steps": 0}, 422, "steps"),
        ("POST", T2I, {"steps": 10**9}, 422, "steps"),
        ("POST", T2I, b'{"cfg_scale": 1e400}', 422, "cfg_scale"),
        ("POST", T2I, {"cfg_scale": "nan"}, 422, "cfg_scale"),
        ("POST", T2I, {"seed": -5}, 422, "seed"),
        ("POST", T2I, {"seed": 2**70}, 422, "seed"),
        ("POST", T2I, {"width": 100000, "height": 100000}, 422, "pixels"),
        ("POST", T2I, {"width": 1024, "height": 1024, "batch_size": 64, "steps": 1}, 422, "memory"),
        ("POST", T2I, {"batch_size": 50, "n_iter": 50, **SMALL}, 422, "limit"),
        ("POST", T2I, {"sampler_name": "Nope", **SMALL}, 404, "Nope"),
        ("POST", T2I, {"sampler_name": "Euler", "scheduler": "bogus", **SMALL}, 404, "bogus"),
        ("POST", T2I, {"override_settings": "x", **SMALL}, 422, "override_settings"),
        ("POST", T2I, {"override_settings": {"sd_model_checkpoint": "../../etc/passwd"}, **SMALL}, 404, "not found"),
        ("POST", T2I, {"override_settings": {"sd_model_checkpoint": str(other_model)}, **SMALL}, 404, "not found"),
        ("POST", T2I, {"override_settings": {"CLIP_stop_at_last_layers": 99}, **SMALL}, 422, "clip_skip"),
        ("POST", T2I, {"prompt": "<lora:../secret:1>", **SMALL}, 422, "lora"),
        ("POST", T2I, {"prompt": "<lora:missing:1>", **SMALL}, 422, "missing"),
        ("POST", T2I, {"enable_hr": True, **SMALL}, 422, "enable_hr"),
        ("POST", T2I, {"script_name": "x/y", **SMALL}, 422, "script"),
        ("POST", T2I, {"alwayson_scripts": {"controlnet": {"args": []}}, **SMALL}, 422, "always on script 'controlnet' not found"),
        ("POST", I2I, {**SMALL}, 404, "init"),
        ("POST", I2I, {"init_images": "abc", **SMALL}, 422, "init_images"),
        ("POST", I2I, {"init_images": [5], **SMALL}, 422, "init_images"),
        ("POST", I2I, {"init_images": ["!!!not base64!!!"], **SMALL}, 422, "init_images"),
        ("POST", I2I, {"init_images": [base64.b64encode(b"hello, not a picture").decode()], **SMALL}, 422, "picture"),
        ("POST", I2I, {"init_images": [_png((2048, 2048))], **SMALL}, 422, "limit"),
        ("POST", I2I, {"init_images": ["http://127.0.0.1:1/x.png"], **SMALL}, 422, "URL"),
        ("POST", I2I, {"init_images": [_png()], "mask": "%%%", **SMALL}, 422, "mask"),
        ("POST", I2I, {"init_images": [_png()], "mask": _png(mode="L", value=0), **SMALL}, 422, "mask"),
        ("POST", I2I, {"init_images": [_png()], "denoising_strength": 3, **SMALL}, 422, "denoising_strength"),
        ("POST", "/sdapi/v1/png-info", {"image": "@@@"}, 422, "image"),
        ("POST", "/sdapi/v1/png-info", {"image": 5}, 422, "image"),
        ("POST", "/sdapi/v1/options", b"[1]", 422, "options"),
        ("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "../models"}, 404, "not found"),
        ("POST", "/sdapi/v1/options", {"CLIP_stop_at_last_layers": "x"}, 422, "CLIP_stop_at_last_layers"),
        ("GET", "/sdapi/v1/progress?skip_current_image=maybe", None, 422, "skip_current_image"),
        ("GET", "/static/../../etc/passwd", None, 404, ""),
        ("GET", "/static/%2e%2e/%2e%2e/etc/passwd", None, 404, ""),
        ("GET", "/sdapi/v1/nope", None, 404, ""),
    ]


def test_hostile_requests_get_one_line_4xx(hostile):
    for method, path, body, status, word in _cases(hostile.other_model):
        data = body if isinstance(body, bytes) else None if body is None else json.dumps(body)
        r = requests.request(method, hostile.url + path, data=data, headers={"Content-Type": "application/json"}, timeout=120)
        where = f"{method} {path} {str(body)[:80]}: {r.status_code} {r.text[:300]}"
        assert r.status_code == status, where
        answer = r.json()
        assert set(answer) == {"error", "detail"}, where
        assert "\n" not in answer["detail"] and "Traceback" not in r.text, where
        assert word.lower() in answer["detail"].lower(), where
        assert requests.get(hostile.url + "/sdapi/v1/options", timeout=30).status_code == 200, f"the server died after {where}"
    assert "Traceback" not in hostile.log()
    assert list((hostile.root / "out").rglob("*")) == []
    good = requests.post(hostile.url + T2I, json={"prompt": "still alive", **SMALL}, timeout=120)
    assert good.status_code == 200 and len(good.json()["images"]) == 1


def test_a_data_url_picture_is_read(hostile):
    r = requests.post(hostile.url + I2I, json={"init_images": ["data:image/png;base64," + _png()], "denoising_strength": 0.5, **SMALL}, timeout=120)
    assert r.status_code == 200, r.text


def test_an_alpha_mask_is_read_as_a1111_reads_it(hostile):
    """A1111's create_binary_mask: an RGBA mask whose alpha is used masks by its alpha, not by its colour."""
    from stable_diffusion.server import a1111

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    rgba[2:5, 2:5, 3] = 255  # opaque square: repaint
    mask = a1111.mask_picture(Image.fromarray(rgba, "RGBA"))
    expected = np.zeros((8, 8), dtype=np.uint8)
    expected[2:5, 2:5] = 255
    np.testing.assert_array_equal(np.asarray(mask), expected)
    assert a1111.mask_picture(Image.new("RGBA", (4, 4), (255, 255, 255, 255))).getextrema() == (255, 255)


def test_save_images_writes_only_into_the_output_folder(tiny_sd1, tmp_path):
    """--save-images saves every picture as A1111 names it (OUTPUT/txt2img-images/DATE/NNNNN-SEED.png) with its infotext."""
    import datetime

    out = tmp_path / "out"
    with serve(tiny_sd1, "--save-images", "--output-dir", out) as s:
        r = requests.post(s.url + T2I, json={"prompt": "../../escape", "seed": 77, "batch_size": 2, **SMALL}, timeout=120)
        assert r.status_code == 200
    folder = out / "txt2img-images" / datetime.date.today().isoformat()
    written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert written == [(folder / "00000-77.png").relative_to(tmp_path), (folder / "00001-78.png").relative_to(tmp_path)]
    infotexts = json.loads(r.json()["info"])["infotexts"]
    assert [Image.open(folder / name).info["parameters"] for name in ("00000-77.png", "00001-78.png")] == infotexts


@pytest.mark.parametrize("args,word", [(["--model", "/no/such/model"], "no such"), (["--api-auth", "nopassword"], "--api-auth"), (["--port", "70000"], "--port"), (["--max-pixels", "0"], "--max-pixels")])
def test_bad_command_lines_are_one_line_and_exit_2(tiny_sd1, args, word):
    import subprocess
    import sys

    command = [sys.executable, "-m", "stable_diffusion.server", "--model", str(tiny_sd1), "--port", "0", *args]
    r = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and word in r.stderr and "Traceback" not in r.stderr
