"""canny.canny against OpenCV's cv2.Canny (opencv-python-headless), the preprocessor the canny
ControlNets were trained with: the edge maps must be identical, pixel for pixel (integer arithmetic
on both sides: nothing to round)."""

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from stable_diffusion.canny import canny


def picture(height: int, width: int, seed: int) -> np.ndarray:
    """A photo-like RGB picture: overlapping shapes, blurred, with sensor-like noise."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(30):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(5, width // 2)), y0 + int(rng.integers(5, height // 2))]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse, draw.rectangle, draw.line)[int(rng.integers(0, 3))](box, fill=colour)
    noisy = np.array(image.filter(ImageFilter.GaussianBlur(1.5))).astype(np.int32) + rng.integers(-8, 9, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


PICTURES = {
    "shapes": picture(96, 128, 0),
    "shapes_odd_size": picture(77, 101, 1),
    "shapes_grey": picture(96, 128, 2)[..., 1].copy(),
    "noise": np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8),
    "one_row": np.random.default_rng(4).integers(0, 256, (1, 40, 3), dtype=np.uint8),
    "flat": np.full((16, 16, 3), 77, np.uint8),
    # Grey steps of 25: the Sobel magnitude at each step is exactly 100, so the floored thresholds
    # of (99.5, 99.9) keep those edges, where 100 would not.
    "steps": np.repeat(np.repeat((np.arange(8) * 25).astype(np.uint8)[None], 4, 1), 16, 0),
}


@pytest.mark.parametrize("thresholds", [(100, 200), (50, 150), (20, 40), (0, 10), (200, 100), (100.7, 200.2), (99.5, 99.9)])
@pytest.mark.parametrize("name", PICTURES)
def test_canny_equals_opencv(name, thresholds):
    image = PICTURES[name]
    expected = cv2.Canny(image, *thresholds)
    out = canny(image, *thresholds)
    assert out.dtype == np.uint8 and out.shape == image.shape[:2]
    assert np.array_equal(out, expected), f"{(out != expected).sum()} of {out.size} pixels differ"


def test_the_pictures_have_edges_to_compare():
    # Guards the test above against comparing empty maps: the shapes give edges at every threshold pair.
    for thresholds in [(100, 200), (50, 150), (20, 40)]:
        assert 0.01 < (cv2.Canny(PICTURES["shapes"], *thresholds) > 0).mean() < 0.5
    assert (cv2.Canny(PICTURES["steps"], 99.5, 99.9) > 0).any() and not (cv2.Canny(PICTURES["steps"], 100, 100) > 0).any()


@pytest.mark.parametrize(
    "image, low, high, match",
    [
        (np.zeros((8, 8, 3), np.float32), 100, 200, "uint8"),
        (np.zeros((8,), np.uint8), 100, 200, "uint8"),
        (np.zeros((8, 8, 3), np.uint8), -1, 200, "thresholds"),
        (np.zeros((8, 8, 3), np.uint8), 100, float("nan"), "thresholds"),
    ],
)
def test_bad_input_is_refused(image, low, high, match):
    with pytest.raises(ValueError, match=match):
        canny(image, low, high)
