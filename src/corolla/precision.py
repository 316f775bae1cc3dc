"""Adapter values at a wire dtype: float32, float16 or bfloat16, as bytes and back, in numpy alone.

Why here (torch-free, in the shared core): the server's strategies must hold exactly the
values a client receives (every update is measured against what was sent), the server's
codec and the ClientApp shim must write the same bytes, and none of them may import torch.
numpy has no bfloat16, so its two conversions are written out below (round to nearest
even on the upper 16 bits of a float32, the rule torch and ml_dtypes use; tested against
torch) rather than adding a package for two bit operations.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

#: dtypes an adapter may travel in (`wire-dtype`); float32 is exact, the others halve the bytes
WIRE_DTYPES = ("float32", "float16", "bfloat16")
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
#: largest finite float16: a value beyond it cannot travel as float16 (it would become inf)
FLOAT16_MAX = 65504.0


def _check(dtype: str) -> None:
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype {dtype!r} is not one of {list(WIRE_DTYPES)}")


def bfloat16_bits(x: NDArray) -> NDArray[np.uint16]:
    """float32 values → their bfloat16 bit patterns, rounded to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # a NaN's low bits may carry into the exponent: keep it a (quiet) NaN
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def from_bfloat16_bits(bits: NDArray[np.uint16]) -> NDArray[np.float32]:
    """bfloat16 bit patterns → float32 (exact: bfloat16 is float32's upper half)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_to(x: NDArray, dtype: str) -> NDArray[np.float32]:
    """The float32 array of the values `x` becomes at `dtype` (a new array; float32: a float32 copy)."""
    _check(dtype)
    if dtype == "float16":
        with np.errstate(over="ignore"):  # beyond 65504 is inf, as in torch (`out_of_range` guards the shim)
            return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return from_bfloat16_bits(bfloat16_bits(x)).reshape(np.shape(x))
    return np.array(x, dtype=np.float32, copy=True)


def to_bytes(x: NDArray, dtype: str) -> bytes:
    """Little-endian bytes of `x` at `dtype` (rounded to nearest even)."""
    _check(dtype)
    if dtype == "bfloat16":
        return bfloat16_bits(x).astype("<u2").tobytes()
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(x, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()


def from_bytes(data: bytes, dtype: str, shape: tuple[int, ...]) -> NDArray[np.float32]:
    """Inverse of `to_bytes`: a float32 array of `shape`; ValueError when the byte count does not fit."""
    _check(dtype)
    count = int(np.prod(shape)) if len(shape) else 1
    if len(data) != count * ITEMSIZE[dtype]:
        raise ValueError(f"{len(data)} bytes cannot hold shape {list(shape)} of {dtype} "
                         f"({count * ITEMSIZE[dtype]} bytes)")
    if dtype == "bfloat16":
        return from_bfloat16_bits(np.frombuffer(data, dtype="<u2")).reshape(shape)
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).astype(np.float32).reshape(shape)


def out_of_range(x: NDArray, dtype: str) -> float | None:
    """The largest |value| of `x` when `dtype` cannot hold it (float16 beyond 65504), else None."""
    if dtype != "float16" or np.size(x) == 0:
        return None
    peak = float(np.max(np.abs(x)))
    return peak if peak > FLOAT16_MAX else None
