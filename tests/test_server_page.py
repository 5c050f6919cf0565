"""The server's web page in a real browser: Debian's chromium driven by Playwright, on a tiny model.

What a person does on the page: type a prompt, press Generate, watch the progress bar and the
preview, interrupt, see the pictures in the gallery with their parameters, reuse those settings,
paint an inpainting mask with the mouse; and the server's error detail shown when it refuses.
The references: the requests the page sends and the answers the server gives (read from the
network, not from the page), A1111's infotext format and the mouse path the test draws.

Needs playwright (the test extra) and /usr/bin/chromium (`apt-get install chromium`); without
them the tests fail. SERVER_PAGE_SCREENSHOT=path also saves the gallery screenshot there
(docs/server.png is made so).
"""

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright
from safetensors.numpy import save_file
from server_process import serve

CHROMIUM = "/usr/bin/chromium"  # Debian's package; Playwright's own browser download is not used
WAIT_MS = 120_000  # generous: a slow CI box; every wait ends as soon as its condition holds
expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("loras")
    save_file({"lora_unet_x.lora_down.weight": np.zeros((1, 1), np.float32)}, folder / "paper-cut.safetensors")
    return folder


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_sd2) -> Path:
    folder = tmp_path_factory.mktemp("models")
    (folder / "tiny-sd2").symlink_to(tiny_sd2, target_is_directory=True)
    return folder


@pytest.fixture(scope="module")
def server(tiny_sd1, lora_dir, models_dir):
    # Offline: the presets the model list offers are not downloaded when the test picks one.
    with serve(tiny_sd1, "--preview-every", "1", "--lora-dir", lora_dir, "--models-dir", models_dir, env={"HF_HUB_OFFLINE": "1"}) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (as .ci/run does)")
    with sync_playwright() as playwright:
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(WAIT_MS)
    script_errors = []
    page.on("pageerror", lambda error: script_errors.append(str(error)))
    page.goto(server.url)
    expect(page.locator("#sampler_name option")).not_to_have_count(0)  # the lists have loaded
    expect(page.locator("#model option")).not_to_have_count(0)
    yield page
    page.close()
    assert not script_errors, script_errors


def set_fields(page, **values):
    for id, value in values.items():
        page.fill(f"#{id}", str(value))


def wait_for(page, condition: str):
    """Wait until the page's JavaScript `condition` holds (`progress` is the bar) or the page shows an error."""
    page.wait_for_function(f"() => {{ const progress = document.getElementById('progress'); return ({condition}) || !document.getElementById('error').hidden }}")
    expect(page.locator("#error")).to_be_hidden()


def progress_value(page) -> float:
    return page.eval_on_selector("#progress", "bar => bar.value")


def decode_png(data: str) -> Image.Image:
    picture = Image.open(io.BytesIO(base64.b64decode(data)))
    assert picture.format == "PNG"
    return picture


def test_the_lists_come_from_the_server(page, server):
    """The pickers hold the server's samplers, schedule types, models and LoRAs; a LoRA goes into the prompt."""
    api = server.url + "/sdapi/v1"
    for select, route, key in [("#sampler_name", "/samplers", "name"), ("#scheduler", "/schedulers", "name"), ("#model", "/sd-models", "title")]:
        expected = [item[key] for item in page.request.get(api + route).json()]
        assert page.eval_on_selector_all(f"{select} option", "options => options.map(o => o.value)") == expected
    assert page.input_value("#model") == page.request.get(api + "/options").json()["sd_model_checkpoint"]

    page.fill("#prompt", "a paper boat")
    page.select_option("#lora", "paper-cut")
    expect(page.locator("#prompt")).to_have_value("a paper boat <lora:paper-cut:1>")
    expect(page.locator("#lora")).to_have_value("")  # ready for the next one


def test_model_picker_switches_the_servers_model(page, server):
    options = server.url + "/sdapi/v1/options"
    first = page.input_value("#model")
    page.select_option("#model", "tiny-sd2")
    expect(page.locator("#model")).to_be_enabled()  # the switch has answered
    expect(page.locator("#error")).to_be_hidden()
    assert page.request.get(options).json()["sd_model_checkpoint"] == "tiny-sd2"
    page.fill("#prompt", "a kite")
    set_fields(page, width=64, height=64, steps=2)
    page.click("#generate")
    expect(page.locator("#gallery .infotext")).to_contain_text("Model: tiny-sd2")

    # A model the server cannot load (a preset not in the offline cache): its detail shows, the picker goes back.
    with page.expect_response(options) as answer:
        page.select_option("#model", "sd-1.5")
    assert not answer.value.ok
    expect(page.locator("#error")).to_have_text(answer.value.json()["detail"])
    expect(page.locator("#model")).to_have_value("tiny-sd2")
    assert page.request.get(options).json()["sd_model_checkpoint"] == "tiny-sd2"

    page.select_option("#model", first)  # the other tests' model again
    expect(page.locator("#model")).to_be_enabled()
    assert page.request.get(options).json()["sd_model_checkpoint"] == first


def test_progress_preview_and_interrupt(page):
    """The bar moves and a preview shows while the job runs; Interrupt ends it with the picture so far (as A1111)."""
    page.fill("#prompt", "a lighthouse at night")
    # 1000 steps (the most the model's schedule has) of the slowest-decoding size the test affords:
    # seconds on a fast GPU, minutes on a small CPU; the test interrupts it either way.
    set_fields(page, width=128, height=128, steps=1000, seed=7)
    page.click("#generate")
    wait_for(page, "progress.value > 0 && progress.value < 100")
    first = progress_value(page)
    wait_for(page, f"progress.value > {first} && progress.value < 100")
    expect(page.locator("#preview")).to_be_visible()
    decode_png(page.get_attribute("#preview", "src").removeprefix("data:image/png;base64,"))
    expect(page.locator("#progress-text")).to_contain_text("of 1000")

    with page.expect_response("**/sdapi/v1/txt2img") as answer:
        page.click("#interrupt")
    assert answer.value.ok
    expect(page.locator("#gallery .result")).to_have_count(1)
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#interrupt")).to_be_disabled()
    expect(page.locator("#error")).to_be_hidden()


def test_gallery_shows_parameters_and_reuse_fills_the_form(page, tmp_path):
    sent = {"width": 64, "height": 96, "steps": 3, "cfg_scale": 5.5, "seed": -1, "batch_size": 2}
    page.fill("#prompt", "a red fox, watercolor")
    page.fill("#negative_prompt", "blurry")
    set_fields(page, **sent)
    page.select_option("#sampler_name", "DPM++ 2M")
    page.select_option("#scheduler", "karras")
    with page.expect_response("**/sdapi/v1/txt2img") as answer:
        page.click("#generate")
    result = answer.value.json()
    info = json.loads(result["info"])
    expect(page.locator("#gallery .result")).to_have_count(2)

    # Each picture is the server's, shown with the parameters the server wrote for it.
    for i, figure in enumerate(page.locator("#gallery .result").all()):
        assert figure.locator("img").get_attribute("src") == "data:image/png;base64," + result["images"][i]
        expect(figure.locator(".infotext")).to_have_text(info["infotexts"][i])
        assert figure.locator("img").evaluate("img => [img.naturalWidth, img.naturalHeight]") == [64, 96]
    page.screenshot(path=tmp_path / "server.png")
    if os.environ.get("SERVER_PAGE_SCREENSHOT"):
        page.screenshot(path=os.environ["SERVER_PAGE_SCREENSHOT"])

    # Change everything, then reuse the second picture's settings: the form is as it was sent,
    # with the seed that picture was drawn with (the request said -1).
    page.fill("#prompt", "something else")
    page.fill("#negative_prompt", "")
    set_fields(page, width=512, height=512, steps=20, cfg_scale=7, seed=1)
    page.select_option("#sampler_name", "Euler")
    page.select_option("#scheduler", "automatic")
    page.locator("#gallery .result").nth(1).locator(".reuse").click()
    expect(page.locator("#prompt")).to_have_value("a red fox, watercolor")
    expect(page.locator("#negative_prompt")).to_have_value("blurry")
    for id in ("width", "height", "steps", "cfg_scale"):
        assert float(page.input_value(f"#{id}")) == sent[id], id
    assert int(page.input_value("#seed")) == info["all_seeds"][1] != -1
    expect(page.locator("#sampler_name")).to_have_value("DPM++ 2M")
    expect(page.locator("#scheduler")).to_have_value("karras")


def test_reuse_reads_a1111_infotext(page):
    """A1111's own example (infotext_utils.parse_generation_parameters' docstring), a quoted value with commas,
    and a legacy sampler name whose suffix names the schedule type."""
    text = (
        "girl with an artist's beret, determined, blue eyes, desert scene\nsecond line of the prompt\n"
        "Negative prompt: ugly, fat, (((deformed))), [blurry]\n"
        'Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 965400086, Size: 512x768, '
        'Lora hashes: "paper-cut: 0123456789ab, other: ba9876543210", Model hash: 45dee52b'
    )
    fields = page.evaluate("text => parseInfotext(text)", text)
    assert fields["Prompt"] == "girl with an artist's beret, determined, blue eyes, desert scene\nsecond line of the prompt"
    assert fields["Negative prompt"] == "ugly, fat, (((deformed))), [blurry]"
    assert fields["Lora hashes"] == "paper-cut: 0123456789ab, other: ba9876543210"
    assert fields["Model hash"] == "45dee52b"
    page.evaluate("text => reuse(text)", text)
    for id, value in {"steps": "20", "cfg_scale": "7", "seed": "965400086", "width": "512", "height": "768", "sampler_name": "DPM++ 2M", "scheduler": "karras"}.items():
        expect(page.locator(f"#{id}")).to_have_value(value)
    # A text without a parameter line is all prompt.
    assert page.evaluate("text => parseInfotext(text)", "just a prompt, nothing else") == {"Prompt": "just a prompt, nothing else", "Negative prompt": ""}


def test_inpaint_sends_the_mask_painted_with_the_mouse(page, tmp_path):
    source = tmp_path / "source.png"
    ramp = np.linspace(0, 255, 64, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (64, 1))] * 3, axis=-1)).save(source)

    page.check("#mode-inpaint")
    page.set_input_files("#init-image", source)
    expect(page.locator("#width")).to_have_value("64")  # the picture has loaded: its size is the generation's
    page.fill("#prompt", "a hole in the wall")
    set_fields(page, steps=3, brush=8)
    page.click("#generate")  # nothing painted yet: the page says so and sends nothing
    expect(page.locator("#error")).to_contain_text("paint the area")

    # Drag across the middle row, from x=16 to x=48 (picture pixels), with an 8-pixel brush.
    page.locator("#mask-canvas").scroll_into_view_if_needed()
    box = page.locator("#mask-canvas").bounding_box()
    sx, sy = box["width"] / 64, box["height"] / 64  # the page shows the picture scaled to its column
    assert sx > 2, "the picture is shown larger than its pixels, so the test sees the scaling of pointer positions"
    page.mouse.move(box["x"] + 16 * sx, box["y"] + 32 * sy)
    page.mouse.down()
    page.mouse.move(box["x"] + 48 * sx, box["y"] + 32 * sy, steps=8)
    page.mouse.up()

    with page.expect_request("**/sdapi/v1/img2img") as request, page.expect_response("**/sdapi/v1/img2img") as answer:
        page.click("#generate")
    body = request.value.post_data_json
    assert body["init_images"] == [base64.b64encode(source.read_bytes()).decode()]
    assert body["denoising_strength"] == 0.75 and body["mask_blur"] == 4
    mask = np.asarray(decode_png(body["mask"]).convert("L"))
    assert mask.shape == (64, 64)
    # White (repaint) along the stroke, black (keep) beyond the brush's 4-pixel radius around it.
    assert (mask[32, 16:49] == 255).all()
    assert (mask[:27, :] == 0).all() and (mask[38:, :] == 0).all()
    assert (mask[:, :11] == 0).all() and (mask[:, 54:] == 0).all()

    assert answer.value.ok, answer.value.text()
    expect(page.locator("#gallery .result")).to_have_count(1)
    expect(page.locator("#gallery .infotext")).to_contain_text("Mask blur: 4")  # the server inpainted with it
    expect(page.locator("#gallery .infotext")).to_contain_text("Denoising strength: 0.75")

    # Image to image: the same picture, no mask.
    page.check("#mode-img2img")
    expect(page.locator("#mask-canvas")).to_be_hidden()
    with page.expect_request("**/sdapi/v1/img2img") as request:
        page.click("#generate")
    assert "mask" not in request.value.post_data_json
    assert request.value.post_data_json["init_images"] == body["init_images"]
    expect(page.locator("#gallery .result")).to_have_count(2)
    assert "Mask blur" not in page.locator("#gallery .infotext").first.text_content()


def test_the_servers_error_detail_is_shown(page):
    page.fill("#prompt", "too big")
    set_fields(page, width=65536, height=65536, steps=1)
    with page.expect_response("**/sdapi/v1/txt2img") as answer:
        page.click("#generate")
    assert 400 <= answer.value.status < 500
    detail = answer.value.json()["detail"]
    assert isinstance(detail, str) and detail
    expect(page.locator("#error")).to_have_text(detail)
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#gallery .result")).to_have_count(0)


def test_the_page_works_behind_basic_auth(browser, tiny_sd1):
    """With --api-auth the browser asks for the password once; the page's own calls then carry it."""
    with serve(tiny_sd1, "--api-auth", "painter:brush") as server:
        stranger = browser.new_context()
        assert stranger.request.get(server.url).status == 401
        stranger.close()
        context = browser.new_context(http_credentials={"username": "painter", "password": "brush"})
        page = context.new_page()
        page.goto(server.url)
        expect(page.locator("#sampler_name option")).not_to_have_count(0)
        expect(page.locator("#model option")).not_to_have_count(0)
        expect(page.locator("#error")).to_be_hidden()
        context.close()
