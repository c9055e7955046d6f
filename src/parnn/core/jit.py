"""Numba for the few kernels of core where NumPy is clearly slower (each says why and points to
the measurement in docs/ENGINES.md): the kernel is written once, as a plain Python loop, and
compiled on its first call, so `import parnn.core` does not import Numba."""

from __future__ import annotations

import functools


def compiled(**options):
    """Decorator: fn compiled by numba.njit(**options) on the first call; fn itself stays
    readable (and runnable, slowly) as `.py_func`."""
    def wrap(fn):
        kernel = None

        @functools.wraps(fn)
        def call(*args):
            nonlocal kernel
            if kernel is None:
                from numba import njit
                kernel = njit(**options)(fn)
            return kernel(*args)

        call.py_func = fn
        return call
    return wrap
