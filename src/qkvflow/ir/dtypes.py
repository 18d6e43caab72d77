"""The float dtypes a run computes in."""

import numpy as np

from .errors import ParamError

__all__ = ["run_dtype"]


def run_dtype(dtype) -> np.dtype:
    """The float dtype of a run, from "float64"/"float32", np.float64/np.float32 or a
    np.dtype; anything else is a ParamError."""
    if isinstance(dtype, (str, type, np.dtype)) and not isinstance(dtype, bool):
        try:
            found = np.dtype(dtype)
        except TypeError:
            found = None  # (compared with a dtype, None would equal float64: hence the names below)
        if found is not None and found.name in ("float64", "float32"):
            return np.dtype(found.name)  # native byte order, whatever was asked
    raise ParamError(f"dtype {dtype!r} is not supported; use float64 or float32")
