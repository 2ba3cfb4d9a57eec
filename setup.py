"""Build hook for the optional C accelerator ``zramd._native`` (metadata is in pyproject.toml).

The extension links the system's liblz4 and libzstd by soname, so only gcc and the Python headers
are needed (scripts/install-deps.sh installs both). ``optional=True``: without a compiler the
install still succeeds and zramd runs its pure-Python page loops.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "zramd._native",
            ["zramd/_native.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            extra_link_args=["-l:liblz4.so.1", "-l:libzstd.so.1"],
            optional=True,
        )
    ]
)
