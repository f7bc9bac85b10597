"""Builds the optional C extensions (fletcher-4, btrfs command decoding, vmsplice); everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "snapferry.zfs.codec._fletcher4c",
            sources=["src/snapferry/zfs/codec/_fletcher4c.c"],
            extra_compile_args=["-O3", "-std=gnu11"],
            # Without a compiler snapferry still installs, and fletcher.py falls back to numpy.
            optional=True,
        ),
        Extension(
            "snapferry.btrfs.codec._btrfsc",
            sources=["src/snapferry/btrfs/codec/_btrfsc.c"],
            extra_compile_args=["-O2", "-std=gnu11"],
            # Without it, stream.decode_command decodes every command in Python.
            optional=True,
        ),
        Extension(
            "snapferry.core._splicec",
            sources=["src/snapferry/core/_splicec.c"],
            extra_compile_args=["-O2", "-std=gnu11"],
            # Without it, core.splice writes with os.writev (a copy).
            optional=True,
        ),
    ]
)
