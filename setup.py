"""Build settings for the optional C extension; all project metadata lives in pyproject.toml.

`mmtrain.packing._fastpack` (one C file, only Python headers needed) speeds up `fill` on
buffer-sized inputs (online packing). It is optional: if it cannot be compiled the install still
succeeds and `mmtrain.packing.algorithms` uses the identical pure-Python path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mmtrain.packing._fastpack",
            ["mmtrain/packing/_fastpack.c"],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
