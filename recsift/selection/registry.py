"""The streaming selectors recsift knows: a new one is a module with its class and ``Config``, and one
entry here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from recsift.registry import Registry
from recsift.selection.reservoir import StratifiedReservoir
from recsift.selection.selector import Selector

SELECTORS: Registry[Selector] = Registry("selector", [StratifiedReservoir])


def make_selector(spec: BaseModel | Mapping[str, Any] | str, budget: int, seed: int = 0,
                  **context: Any) -> Selector:
    """The selector ``spec`` describes, with the coreset ``budget`` and a seed."""
    return SELECTORS.build(spec, budget=budget, seed=seed, **context)
