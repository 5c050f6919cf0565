"""The Canny edge detector as OpenCV's ``cv2.Canny(image, low, high)`` computes it, in numpy.

The preprocessor of the canny ControlNets (A1111's ControlNet extension and diffusers' examples run
``cv2.Canny`` on the RGB picture), ported from the algorithm of OpenCV's ``canny.cpp`` (aperture 3,
L1 gradient, the defaults): 3x3 Sobel derivatives with replicated borders; on a colour picture,
per pixel, the channel with the largest |dx| + |dy| (the first on ties); non-maximum suppression
along the gradient direction binned by OpenCV's fixed-point tangents, with its asymmetric
comparisons; hysteresis: every candidate above ``low`` 8-connected to one above ``high``.
"""

import numpy as np

# tan(22.5°) in Q15 fixed point, as OpenCV's TG22.
_TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)


def _sobel(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3x3 Sobel d/dx and d/dy of an (H, W, C) picture, borders replicated: int32 (H, W, C) each."""
    p = np.pad(image.astype(np.int32), [(1, 1), (1, 1), (0, 0)], mode="edge")
    dx = (p[:-2, 2:] - p[:-2, :-2]) + 2 * (p[1:-1, 2:] - p[1:-1, :-2]) + (p[2:, 2:] - p[2:, :-2])
    dy = (p[2:, :-2] - p[:-2, :-2]) + 2 * (p[2:, 1:-1] - p[:-2, 1:-1]) + (p[2:, 2:] - p[:-2, 2:])
    return dx, dy


def _strongest_channel(dx: np.ndarray, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(|dx| + |dy|, dx, dy) of each pixel's channel with the largest |dx| + |dy|, (H, W) each."""
    magnitude = np.abs(dx) + np.abs(dy)
    pick = magnitude.argmax(axis=-1)[..., None]  # argmax takes the first of equal values, as OpenCV
    return (np.take_along_axis(a, pick, axis=-1)[..., 0] for a in (magnitude, dx, dy))


def _suppressed(magnitude: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Where the magnitude is a maximum along its gradient direction (OpenCV's comparisons; 0 outside the picture)."""
    H, W = magnitude.shape
    m = np.pad(magnitude, 1)

    def at(row: int, col) -> np.ndarray:
        """The padded magnitude shifted by (row, col) pixels; col may vary per pixel."""
        cols = np.arange(W)[None, :] + 1 + col
        return m[np.arange(H)[:, None] + 1 + row, cols]

    x = np.abs(dx).astype(np.int64)
    y = np.abs(dy).astype(np.int64) << 15
    tg22x = x * _TG22
    tg67x = tg22x + (x << 16)
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg67x)
    diagonal = ~horizontal & ~vertical
    s = np.where((dx ^ dy) < 0, -1, 1)  # the diagonal's slope: \ when dx and dy share a sign
    return (
        (horizontal & (magnitude > at(0, -1)) & (magnitude >= at(0, 1)))
        | (vertical & (magnitude > at(-1, 0)) & (magnitude >= at(1, 0)))
        | (diagonal & (magnitude > at(-1, -s)) & (magnitude > at(1, s)))
    )


def _hysteresis(candidates: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The candidates 8-connected (through candidates) to a strong pixel, as OpenCV's edge stack grows."""
    H, W = candidates.shape
    edges = np.zeros((H + 2, W + 2), bool)  # a frame that is never a candidate stops the walk
    open_ = np.pad(candidates & ~strong, 1)
    edges[1:-1, 1:-1] = strong
    step = W + 2
    neighbours = (-step - 1, -step, -step + 1, -1, 1, step - 1, step, step + 1)
    flat_edges, flat_open = edges.reshape(-1), open_.reshape(-1)
    stack = list(np.flatnonzero(flat_edges))
    while stack:
        i = stack.pop()
        for d in neighbours:
            j = i + d
            if flat_open[j]:
                flat_open[j] = False
                flat_edges[j] = True
                stack.append(j)
    return edges[1:-1, 1:-1]


def canny(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """``cv2.Canny(image, low, high)``: a uint8 (H, W) or (H, W, C) picture -> (H, W) uint8 edges (255) on 0.

    The thresholds compare with the L1 gradient |dx| + |dy| of the 3x3 Sobel (up to 4 * 255 * 2 on
    8-bit pictures); they are floored as OpenCV floors them and swapped when low > high.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
        raise ValueError(f"canny: expected a uint8 (H, W) or (H, W, C) picture, got {image.dtype} {image.shape}")
    if not (np.isfinite(low) and np.isfinite(high)) or min(low, high) < 0:
        raise ValueError(f"canny: thresholds must be numbers >= 0, got low={low!r}, high={high!r}")
    low, high = sorted((int(np.floor(low)), int(np.floor(high))))
    dx, dy = _sobel(image if image.ndim == 3 else image[..., None])
    magnitude, dx, dy = _strongest_channel(dx, dy)
    candidates = (magnitude > low) & _suppressed(magnitude, dx, dy)
    return np.where(_hysteresis(candidates, candidates & (magnitude > high)), np.uint8(255), np.uint8(0))
