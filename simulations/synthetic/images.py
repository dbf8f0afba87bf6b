"""Synthetic lumbar radiograph and T2 axial MRI pixels with a controllable foraminal-narrowing signal.

Shapes are drawn in millimetres, so a scanner's pixel spacing changes the matrix, not the
anatomy; the DICOM pipeline's physical resampling undoes it. Each view sees the patient's
narrowing through its own measurement noise, so combining views helps, as in Kim & Chang 2024.
"""

from __future__ import annotations

import numpy as np

RADIOGRAPH_CANVAS_MM = 84.0
MRI_CANVAS_MM = 110.0


def _grid(size_px: int, spacing_mm: float, shift_mm: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size_px) - (size_px - 1) / 2) * spacing_mm
    y, x = np.meshgrid(coords - shift_mm[0], coords - shift_mm[1], indexing="ij")
    return y, x


def _soft(distance: np.ndarray, edge_mm: float = 0.8) -> np.ndarray:
    """1 inside (distance < 0), 0 outside, with a blurred edge like a real projection."""
    return 1.0 / (1.0 + np.exp(np.clip(distance / edge_mm, -30, 30)))


def _ellipse(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    r = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
    return _soft((r - 1.0) * min(ry, rx))


def _box(y: np.ndarray, x: np.ndarray, cy: float, cx: float, hy: float, hx: float) -> np.ndarray:
    return _soft(np.maximum(np.abs(y - cy) - hy, np.abs(x - cx) - hx))


def radiograph_view(view: str, narrowing: float, scale: float, shift_mm: tuple[float, float],
                    size_px: int, spacing_mm: float) -> np.ndarray:
    """Linear attenuation image in [0, 1] of three lumbar levels, centred on the injected level."""
    y, x = _grid(size_px, spacing_mm, shift_mm)
    y, x = y / scale, x / scale
    disc = 9.0 * (1.0 - 0.30 * narrowing)  # disc height (mm) shrinks with degeneration
    body_h = 24.0
    img = 0.18 + 0.10 * _box(y, x, 0, 0, 40, 32)  # soft tissue
    centres = (-(body_h + disc), 0.0, body_h + disc)
    lateral = view in ("LAT", "LOBL", "ROBL")
    side = -1.0 if view == "LOBL" else 1.0
    for cy in centres:
        cx = -8.0 * side if lateral else 0.0
        img += 0.45 * _box(y, x, cy, cx, body_h / 2, 16.0 if lateral else 20.0)
        if lateral:
            # posterior elements with the foramen between pedicles: height tracks narrowing
            img += 0.25 * _box(y, x, cy - 2, cx + side * 24, body_h / 2 - 3, 6.0)
        else:
            for px in (-13.0, 13.0):  # pedicles seen end-on
                img += 0.2 * _ellipse(y, x, cy - 5, px, 4.5, 3.0) - 0.1 * _ellipse(y, x, cy - 5, px, 2.5, 1.5)
    for cy in (centres[0] + body_h / 2 + disc / 2, centres[1] + body_h / 2 + disc / 2):
        if lateral:
            foramen_h = 11.0 * (1.0 - 0.40 * narrowing)
            img -= 0.22 * _ellipse(y, x, cy, -8.0 * side + side * 22, max(foramen_h, 2.0) / 2, 4.5)
    return np.clip(img, 0.0, 1.0)


def mri_t2_axial(narrowing: float, scale: float, shift_mm: tuple[float, float],
                 size_px: int, spacing_mm: float) -> np.ndarray:
    """T2 signal in [0, 1]: disc, bright CSF in the canal, fat-filled foramina that narrow.

    The thecal sac shrinks with the same narrowing: the stenosis severity that the stenosis-surgery
    task (lss_surgery_zcq) reads from this slice."""
    y, x = _grid(size_px, spacing_mm, shift_mm)
    y, x = y / scale, x / scale
    img = 0.15 + 0.15 * _ellipse(y, x, 5, 0, 50, 48)  # paraspinal muscle
    img += 0.30 * _ellipse(y, x, -14, 0, 16, 22)  # disc
    canal = 7.0 * (1.0 - 0.30 * narrowing)
    img += 0.55 * _ellipse(y, x, 10, 0, max(canal, 1.5), 9.0)  # thecal sac (CSF bright on T2)
    foramen = 5.0 * (1.0 - 0.40 * narrowing)
    for side in (-1.0, 1.0):
        img += 0.40 * _ellipse(y, x, 4, side * 17, 5.0, max(foramen, 0.8))
        img += 0.12 * _ellipse(y, x, 20, side * 15, 6.0, 5.0)  # facet joints
    return np.clip(img, 0.0, 1.0)
