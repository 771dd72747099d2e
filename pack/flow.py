"""Optical flow between frames, and its 8-bit image encodings.

Methods (docs/benchmarks.md, "Which flow" measures what each costs and what a flow stream
learns from it):
- farneback: OpenCV's documented example parameters, as the baseline's flow tool used;
- dis, dis-fast, dis-medium: DIS at OpenCV's ultrafast, fast and medium presets (fast and
  medium with variational refinement);
- tvl1: TV-L1 (OpenCV contrib's DualTVL1OpticalFlow) with fewer scales, warps and
  iterations than its defaults, which cost about 80x Farneback: affordable for UCF101-sized
  data, not for Kinetics on CPUs.

Encodings, each a 3-channel image whose channel 0 is x (a horizontal mirror is x -> 255 - x
for both): xym, the baseline's (x, y, magnitude), and xy, the TSN/MMAction2 convention (x
and y; channel 2 a constant 128 that carries nothing).
"""
from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

FlowFn = Callable[[np.ndarray, np.ndarray], np.ndarray]

METHODS = ("farneback", "dis", "dis-fast", "dis-medium", "tvl1")
ENCODINGS = ("xym", "xy")
# The bound each encoding is meant with (the baseline's 8 px, TSN's 20 px): --flow-bound's default.
DEFAULT_BOUNDS = {"xym": 8.0, "xy": 20.0}
DIS_PRESETS = {"dis": "ULTRAFAST", "dis-fast": "FAST", "dis-medium": "MEDIUM"}
# TV-L1 at 3 scales a halving apart (not 5 at 0.8), 2 warps (not 5), 1 outer x 10 inner iterations
# (not 10 x 30), a looser stop: about 6x Farneback's time on a real frame pair (docs/benchmarks.md)
# where OpenCV's defaults take ~80x.
TVL1 = {"nscales": 3, "scaleStep": 0.5, "warps": 2, "outerIterations": 1, "innnerIterations": 10, "epsilon": 0.02}


def make_flow_fn(method: str) -> FlowFn:
    """Return f(prev_gray, next_gray) -> HxWx2 float32 flow in pixels (x right, y down)."""
    if method == "farneback":
        return lambda a, b: cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    if method in DIS_PRESETS:
        dis = cv2.DISOpticalFlow_create(getattr(cv2, f"DISOPTICAL_FLOW_PRESET_{DIS_PRESETS[method]}"))
        return lambda a, b: dis.calc(a, b, None)
    if method == "tvl1":
        optflow = getattr(cv2, "optflow", None)
        if optflow is None:
            raise ValueError("--flow tvl1 needs OpenCV's contrib modules: pip uninstall opencv-python-headless, then "
                             "pip install opencv-contrib-python-headless (one of the two, never both)")
        tvl1 = optflow.DualTVL1OpticalFlow_create(**TVL1)
        return lambda a, b: tvl1.calc(a, b, None)
    raise ValueError(f"unknown flow method {method!r}; use one of {', '.join(METHODS)}")


def encode_flow(flow: np.ndarray, bound: float, encoding: str = "xym") -> np.ndarray:
    """Flow (HxWx2) -> HxWx3 uint8 in OpenCV's BGR order, so that its JPEG decodes as RGB = (x, y, third).

    third: the magnitude (xym) or 128 (xy). Each value is round(v * 128 / bound + 128),
    clipped to 0..255, in one saturating OpenCV pass per channel.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown flow encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    x, y = np.ascontiguousarray(flow[..., 0]), np.ascontiguousarray(flow[..., 1])  # faster than cv2.split
    scale = 128.0 / bound

    def to_uint8(channel: np.ndarray) -> np.ndarray:
        return cv2.addWeighted(channel, scale, channel, 0.0, 128.0, dtype=cv2.CV_8U)

    third = to_uint8(cv2.magnitude(x, y)) if encoding == "xym" else np.full(x.shape, 128, np.uint8)
    return cv2.merge([third, to_uint8(y), to_uint8(x)])


def decode_flow(image: np.ndarray, bound: float) -> np.ndarray:
    """Inverse of encode_flow for the x and y channels (RGB order), for every encoding: HxWx2 float32 pixels."""
    return (image[..., :2].astype(np.float32) - 128.0) * (bound / 128.0)
