"""Everything is in setup.cfg; this file only declares the C extension (setup.cfg cannot)."""
from setuptools import Extension, setup

setup(ext_modules=[
    # Decodes only a training crop's part of a JPEG. Needs libjpeg-turbo's headers (Debian and
    # Ubuntu: libjpeg-turbo8-dev or libjpeg62-turbo-dev); without them it is skipped and the
    # CPU loader decodes whole images (slower, same crops).
    Extension("loaders._jpeg_region", ["loaders/_jpeg_region.c"], libraries=["jpeg"], optional=True),
    # Prints what to run when DALI crashes the process (a signal handler; no library needed).
    Extension("loaders._crash_hint", ["loaders/_crash_hint.c"], optional=True),
])
