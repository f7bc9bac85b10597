"""Builds the C fletcher-4 extension; everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "snapferry.zfs.codec._fletcher4c",
            sources=["src/snapferry/zfs/codec/_fletcher4c.c"],
            extra_compile_args=["-O3", "-std=gnu11"],
            # Without a compiler snapferry still installs, and fletcher.py falls back to numpy.
            optional=True,
        )
    ]
)
