"""Checkpoint state as plain data: what `torch.load(weights_only=True)` reads back without running any code.

A checkpoint keeps dicts, lists, tuples, strings, numbers, None and tensors as they are. The few other things
our state holds become tagged dicts of those: a numpy array (the numpy RNG state, a segment's images) keeps its
dtype, shape and bytes; the batch stream's segments and packed batches (the dataclasses in `DATACLASSES`) keep
their fields. `from_plain(to_plain(x))` equals `x` exactly, bit for bit; anything else is refused when saved,
naming where it sits in the state.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

import numpy as np
import torch

from reasonedit.data.packing import PackedBatch
from reasonedit.data.segments import GeneratorSegment, ReasonerSegment

TAG = "__plain__"  # the key of an encoded value; a dict of our state never has it
DATACLASSES = {cls.__name__: cls for cls in (PackedBatch, ReasonerSegment, GeneratorSegment)}
_ATOMS = (str, int, float, bool, type(None), bytes, torch.Tensor, torch.nn.Parameter)


def to_plain(value: Any, where: str = "state") -> Any:
    """`value` with every numpy array, numpy scalar and known dataclass encoded as a tagged dict."""
    if type(value) in _ATOMS:
        return value
    if type(value) is list:
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if type(value) is tuple:
        return tuple(to_plain(v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict):  # an OrderedDict becomes a dict: the order is kept either way
        if TAG in value:
            raise TypeError(f"checkpoint state {where}: a dict with the key {TAG!r}, which marks encoded values")
        for k in value:
            if type(k) not in (str, int):
                raise TypeError(f"checkpoint state {where}: key {k!r} is a {type(k).__name__}; keys must be "
                                "strings or ints")
        return {k: to_plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (np.ndarray, np.generic)):
        array = np.asarray(value)
        if array.dtype.kind in "OV":
            raise TypeError(f"checkpoint state {where}: a numpy array of dtype {array.dtype} is not plain data")
        data = torch.from_numpy(np.ascontiguousarray(array).reshape(-1).view(np.uint8).copy())
        return {TAG: "ndarray" if isinstance(value, np.ndarray) else "numpy_scalar", "dtype": array.dtype.str,
                "shape": list(array.shape), "bytes": data}
    if is_dataclass(value) and DATACLASSES.get(type(value).__name__) is type(value):
        return {TAG: type(value).__name__,
                "fields": {f.name: to_plain(getattr(value, f.name), f"{where}.{f.name}") for f in fields(value)}}
    raise TypeError(f"checkpoint state {where}: a {type(value).__module__}.{type(value).__qualname__} is not plain "
                    f"data (tensors, numbers, strings, lists, dicts, numpy arrays or {', '.join(DATACLASSES)}); "
                    "save what identifies it instead, or add its dataclass to reasonedit.training.plain.DATACLASSES")


def from_plain(value: Any) -> Any:
    """The inverse of `to_plain`."""
    if type(value) is list:
        return [from_plain(v) for v in value]
    if type(value) is tuple:
        return tuple(from_plain(v) for v in value)
    if type(value) is not dict:
        return value
    tag = value.get(TAG)
    if tag is None:
        return {k: from_plain(v) for k, v in value.items()}
    if tag in ("ndarray", "numpy_scalar"):
        array = value["bytes"].numpy().view(np.dtype(value["dtype"])).reshape(value["shape"]).copy()
        return array if tag == "ndarray" else array[()]
    if tag in DATACLASSES:
        return DATACLASSES[tag](**{k: from_plain(v) for k, v in value["fields"].items()})
    raise ValueError(f"checkpoint state: unknown encoded value {tag!r}; it was written by another version of "
                     "reasonedit")


__all__ = ["DATACLASSES", "from_plain", "to_plain"]
