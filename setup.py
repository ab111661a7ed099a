"""Build hook for the optional C kernels of the update codec (everything else is in pyproject).

The extension is optional: without a C compiler the install still succeeds and
``schemas.codec.kernels`` uses its pure-numpy path (same results, slower decode).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "schemas.codec._kernels",
            ["schemas/codec/_kernels.c"],
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
