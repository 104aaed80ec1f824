"""Build script for the one C extension; everything else is in setup.cfg.

``activecall.media._rtpcore`` does the per-packet RTP work of every leg (see the
comment at the top of src/activecall/media/_rtpcore.c, and docs/media.md).
``pip install -e .`` builds it next to its source, which needs a C compiler and
Python's headers (``make setup`` installs gcc through tools/install-debian-deps).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "activecall.media._rtpcore",
            ["src/activecall/media/_rtpcore.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
        ),
    ],
)
