"""Worker processes forked safely: pack's pool and the CPU loader's DataLoader workers start through this."""
from __future__ import annotations

import contextlib

import cv2


@contextlib.contextmanager
def opencv_threads_stopped():
    """OpenCV's thread pool stopped in this process meanwhile: a fork while its threads run hangs the child.

    The child inherits the pool without its threads; its first cv2.setNumThreads, or any
    parallel OpenCV call, then waits on them for ever (seen: a CPU loader started after
    OpenCV resized images in the same process). OpenCV restarts the pool when next used.
    """
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)
