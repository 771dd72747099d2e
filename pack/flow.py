"""Optical flow between frames and its 8-bit image encoding (the baseline's)."""
from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

FlowFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def make_flow_fn(method: str) -> FlowFn:
    """Return f(prev_gray, next_gray) -> HxWx2 float32 flow in pixels."""
    if method == "farneback":
        # OpenCV's documented example parameters, as the baseline's flow tool used.
        return lambda a, b: cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0)
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
        return lambda a, b: dis.calc(a, b, None)
    raise ValueError(f"unknown flow method {method!r}; use farneback or dis")


def encode_flow(flow: np.ndarray, bound: float) -> np.ndarray:
    """Flow (HxWx2) -> HxWx3 uint8 in RGB order: x, y, magnitude, each v*128/bound + 128, rounded."""
    out = np.empty(flow.shape[:2] + (3,), np.float32)
    out[..., :2] = flow
    out[..., 2] = cv2.magnitude(flow[..., 0], flow[..., 1])
    out *= 128.0 / bound
    out += 128.5  # + 0.5, then truncation: rounds to nearest
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def decode_flow(image: np.ndarray, bound: float) -> np.ndarray:
    """Inverse of encode_flow for the x and y channels (RGB order): HxWx2 float32 pixels."""
    return (image[..., :2].astype(np.float32) - 128.0) * (bound / 128.0)
