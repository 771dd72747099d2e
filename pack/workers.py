"""Worker processes forked safely: pack's pool and the CPU loader's DataLoader workers start through this."""
from __future__ import annotations

import contextlib
import ctypes
import signal
import sys

import cv2

PR_SET_PDEATHSIG = 1  # linux/prctl.h


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


def die_with_parent() -> None:
    """Have the kernel kill this worker when its parent dies, even by kill -9: no orphan goes on writing (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
