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
    """Flow (HxWx2) -> HxWx3 uint8 in OpenCV's BGR order (B = magnitude, G = y, R = x), so that
    its JPEG decodes as RGB = (x, y, magnitude). Each channel is round(v * 128 / bound + 128),
    clipped to 0..255, in one saturating OpenCV pass per channel."""
    x, y = np.ascontiguousarray(flow[..., 0]), np.ascontiguousarray(flow[..., 1])  # faster than cv2.split
    scale = 128.0 / bound

    def to_uint8(channel: np.ndarray) -> np.ndarray:
        return cv2.addWeighted(channel, scale, channel, 0.0, 128.0, dtype=cv2.CV_8U)

    return cv2.merge([to_uint8(cv2.magnitude(x, y)), to_uint8(y), to_uint8(x)])


def decode_flow(image: np.ndarray, bound: float) -> np.ndarray:
    """Inverse of encode_flow for the x and y channels (RGB order): HxWx2 float32 pixels."""
    return (image[..., :2].astype(np.float32) - 128.0) * (bound / 128.0)
