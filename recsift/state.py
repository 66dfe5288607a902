"""Component state: what a stateful component returns from ``state_dict()`` and takes in
``load_state_dict()``. Tensors travel as safetensors, everything else as JSON; never pickle.

Stores persist the bytes of a :class:`State` (or rows derived from it) and nothing else, so a component
restored from them continues exactly where it stopped, and two runs can be compared component by
component with :func:`differences`. A leaf: this module imports nothing of recsift.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

_META_KEY = "recsift"


@dataclass
class State:
    """Named tensors plus JSON-able metadata."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        tensors = {k: v.detach().contiguous() for k, v in self.tensors.items()}
        return bytes(st_save(tensors, metadata={_META_KEY: json.dumps(self.meta)}))

    @classmethod
    def from_bytes(cls, blob: bytes) -> State:
        return cls(dict(st_load(blob)), State.meta_of(blob))

    @staticmethod
    def meta_of(blob: bytes) -> dict[str, Any]:
        """The metadata of :meth:`to_bytes`'s ``blob``, from its header alone (no tensor is decoded)."""
        return dict(json.loads(safetensors_metadata(blob).get(_META_KEY, "{}")))

    def put(self, prefix: str, part: State) -> State:
        """Nest ``part`` under ``prefix`` (for a component made of components); returns self."""
        self.tensors.update({f"{prefix}.{k}": v for k, v in part.tensors.items()})
        self.meta[prefix] = part.meta
        return self

    def part(self, prefix: str) -> State:
        """What :meth:`put` nested under ``prefix``."""
        head = prefix + "."
        return State({k[len(head):]: v for k, v in self.tensors.items() if k.startswith(head)},
                     dict(self.meta.get(prefix, {})))


def safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors blob (its header is 8 bytes of length, then JSON)."""
    size = int.from_bytes(blob[:8], "little")
    return dict(json.loads(blob[8 : 8 + size]).get("__metadata__", {}))


def differences(a: State, b: State, atol: float = 0.0, path: str = "") -> list[str]:
    """Where two states differ: tensor names, shapes and values (within ``atol`` for floats, NaN equal
    to NaN) and metadata (floats within ``atol``). Empty when they are the same."""
    out = []
    for name in sorted(set(a.tensors) | set(b.tensors)):
        x, y = a.tensors.get(name), b.tensors.get(name)
        where = f"{path}tensor {name}"
        if x is None or y is None:
            out.append(f"{where}: only in {'second' if x is None else 'first'}")
        elif x.shape != y.shape or x.dtype != y.dtype:
            out.append(f"{where}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}")
        elif x.is_floating_point():
            if not torch.allclose(x, y, rtol=0.0, atol=atol, equal_nan=True):
                out.append(f"{where}: max |diff| {float((x - y).abs().nan_to_num().max()):.3g}")
        elif not torch.equal(x, y):
            out.append(f"{where}: {int((x != y).sum())} elements differ")
    out += _meta_differences(a.meta, b.meta, atol, path + "meta")
    return out


def _meta_differences(x: Any, y: Any, atol: float, where: str) -> list[str]:
    if isinstance(x, dict) and isinstance(y, dict):
        out = []
        for k in sorted(set(x) | set(y), key=str):
            if k not in x or k not in y:
                out.append(f"{where}.{k}: only in {'second' if k not in x else 'first'}")
            else:
                out += _meta_differences(x[k], y[k], atol, f"{where}.{k}")
        return out
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):  # JSON has no tuples
        if len(x) != len(y):
            return [f"{where}: length {len(x)} vs {len(y)}"]
        return [d for i, (p, q) in enumerate(zip(x, y, strict=True)) for d in _meta_differences(p, q, atol, f"{where}[{i}]")]
    if isinstance(x, float) or isinstance(y, float):
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and (
                math.isclose(x, y, rel_tol=0.0, abs_tol=atol) or (math.isnan(x) and math.isnan(y))):
            return []
        return [f"{where}: {x!r} vs {y!r}"]
    return [] if x == y else [f"{where}: {x!r} vs {y!r}"]
