"""Adapters in Flower ArrayRecords at the run's wire dtype, both ways (server codec and ClientApp shim).

A set of arrays travels *packed*: one Array holding every array's raw little-endian bytes at
the wire dtype (float32, float16 or bfloat16), one after another, plus one small Array with
the layout (names and shapes, JSON, zlib-compressed). Why not Flower's usual one Array per
state-dict name: each Array costs Flower about 700 bytes of framing (an Array object and a
chunk object, each pushed with its 64-hex id, node, run and session), which is 14-24 % of a
rank-4 MiniLM or SmolLM2 adapter whose factors are a few kilobytes each; packed, an update
is within 1-4 % of its raw bytes (bench/results/wire_bytes.md). numpy's `.npy` header and
its lack of bfloat16 are avoided too.

Reading also accepts Flower's per-name form (float32 or float16 `Array.from_numpy_ndarray`
arrays, or per-name raw arrays), so a reply built the usual Flower way still works.
Everything read is checked (layout, dtype, shape, byte count) and widened to float32, the
only dtype the server computes in.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from corolla import precision

#: Array.stype of corolla's raw encoding (one array, or the packed buffer of many)
RAW_STYPE = "corolla.raw-le"
#: Array.stype of a packed record's layout: zlib-compressed JSON {"names": [...], "shapes": [[...], ...]}
LAYOUT_STYPE = "corolla.layout"
#: Flower's numpy encoding (SType.NUMPY)
NUMPY_STYPE = "numpy.ndarray"
#: record keys of the packed form
PACKED, LAYOUT = "corolla.packed", "corolla.layout"
#: a layout larger than this once decompressed is refused (a zip bomb must not exhaust memory)
MAX_LAYOUT_BYTES = 64 * 1024 * 1024


class ArrayFormatError(ValueError):
    """An array on the wire has a dtype, shape or size corolla does not accept."""


def to_array(x: np.ndarray, dtype: str) -> Array:
    """One array at `dtype` (rounded to nearest even): Flower's numpy form for float32, raw bytes otherwise."""
    if dtype == "float32":
        return Array.from_numpy_ndarray(np.ascontiguousarray(x, dtype=np.float32))
    return Array(dtype=dtype, shape=tuple(int(d) for d in np.shape(x)), stype=RAW_STYPE,
                 data=precision.to_bytes(x, dtype))


def to_record(arrays: Mapping[str, np.ndarray], dtype: str) -> ArrayRecord:
    """`arrays` packed at `dtype`: one buffer in the mapping's order, and its layout (see the module docstring)."""
    names = list(arrays)
    shapes = [[int(d) for d in np.shape(arrays[k])] for k in names]
    data = b"".join(precision.to_bytes(arrays[k], dtype) for k in names)
    layout = zlib.compress(json.dumps({"names": names, "shapes": shapes}, separators=(",", ":")).encode(), 6)
    count = sum(math.prod(s) for s in shapes)
    return ArrayRecord(array_dict={
        PACKED: Array(dtype=dtype, shape=(count,), stype=RAW_STYPE, data=data),
        LAYOUT: Array(dtype="uint8", shape=(len(layout),), stype=LAYOUT_STYPE, data=layout),
    })


def from_array(name: str, a: Array) -> np.ndarray:
    """One wire array as float32; ArrayFormatError naming the array and what is wrong."""
    if a.stype == RAW_STYPE:
        if a.dtype not in precision.WIRE_DTYPES:
            raise ArrayFormatError(f"array `{name}` has dtype {a.dtype!r}; the wire carries only "
                                   f"{list(precision.WIRE_DTYPES)}")
        shape = tuple(a.shape)
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ArrayFormatError(f"array `{name}` has shape {list(shape)}, not a list of sizes >= 0")
        try:
            return precision.from_bytes(a.data, a.dtype, shape)
        except ValueError as e:
            raise ArrayFormatError(f"array `{name}`: {e}") from None
    if a.stype == NUMPY_STYPE:
        try:
            x = a.numpy()
        except (ValueError, TypeError) as e:
            raise ArrayFormatError(f"array `{name}` is not a readable numpy array: {e}") from None
        if x.dtype not in (np.float32, np.float16):
            raise ArrayFormatError(f"array `{name}` has dtype {x.dtype}; the wire carries only "
                                   f"{list(precision.WIRE_DTYPES)}")
        return x.astype(np.float32)
    raise ArrayFormatError(f"array `{name}` has serialization {a.stype!r}; expected {RAW_STYPE!r} or "
                           f"{NUMPY_STYPE!r}")


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Every array of a record as float32, packed or per name; ArrayFormatError naming what is wrong."""
    if PACKED in record or LAYOUT in record:
        return _unpack(record)
    return {k: from_array(k, a) for k, a in record.items()}


def _unpack(record: ArrayRecord) -> dict[str, np.ndarray]:
    if set(record) != {PACKED, LAYOUT}:
        raise ArrayFormatError(f"a packed record holds exactly `{PACKED}` and `{LAYOUT}`; this one holds "
                               f"{sorted(record)}")
    names, shapes = _layout(record[LAYOUT])
    flat = from_array(PACKED, record[PACKED])
    if flat.ndim != 1 or flat.size != sum(math.prod(s) for s in shapes):
        raise ArrayFormatError(f"the packed buffer holds {flat.size} values but its layout needs "
                               f"{sum(math.prod(s) for s in shapes)}")
    out, start = {}, 0
    for name, shape in zip(names, shapes):
        n = math.prod(shape)
        out[name] = flat[start:start + n].reshape(shape)
        start += n
    return out


def _layout(a: Array) -> tuple[list[str], list[tuple[int, ...]]]:
    """The names and shapes of a packed record, every field checked."""
    if a.stype != LAYOUT_STYPE:
        raise ArrayFormatError(f"`{LAYOUT}` has serialization {a.stype!r}; expected {LAYOUT_STYPE!r}")
    try:
        inflater = zlib.decompressobj()
        text = inflater.decompress(a.data, MAX_LAYOUT_BYTES)
        if inflater.unconsumed_tail:
            raise ArrayFormatError(f"the layout is over {MAX_LAYOUT_BYTES} bytes decompressed")
        layout = json.loads(text)
        names, shapes = layout["names"], [tuple(s) for s in layout["shapes"]]
    except (zlib.error, ValueError, KeyError, TypeError) as e:
        raise ArrayFormatError(f"the packed record's layout is unreadable ({e})") from None
    if (not isinstance(names, list) or len(names) != len(shapes) or len(set(names)) != len(names)
            or not all(isinstance(n, str) for n in names)):
        raise ArrayFormatError("the packed record's layout must name each array once, with one shape per name")
    for name, shape in zip(names, shapes):
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ArrayFormatError(f"array `{name}` has shape {list(shape)}, not a list of sizes >= 0")
    return names, shapes


def nbytes(arrays: Mapping[str, object], dtype: str = "float32") -> int:
    """Payload bytes of a set of arrays: a Flower `Array` at its own dtype, a numpy array at `dtype`.

    Counted from shapes, so a reply's size is known without decoding its tensors again.
    """
    total = 0
    for a in arrays.values():
        own = getattr(a, "stype", None) is not None
        if own and a.stype == LAYOUT_STYPE:
            continue  # names and shapes, not payload
        itemsize = precision.ITEMSIZE.get(str(a.dtype), 4) if own else precision.ITEMSIZE[dtype]
        total += math.prod(tuple(a.shape)) * itemsize
    return int(total)
