"""Registries of pluggable components (scorers, selectors), the peft way: each implementation comes with
its own pydantic config class whose ``type`` field names it, and a registry validates a config section
against the discriminated union of the registered configs, then builds the implementation from it.

A component class declares ``Config`` (a :class:`ComponentConfig` subclass with ``type: Literal[...]``);
its constructor's keyword arguments are that config's fields, plus whatever the caller supplies as
context (a seed, a budget). Adding a scorer or selector is one module and one entry in its package's
registry list. A leaf: this module imports nothing of recsift.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Generic, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError


class ComponentConfig(BaseModel):
    """The options of one implementation; ``type`` is the discriminator (the registered name)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: str

    def options(self) -> dict[str, Any]:
        """The constructor's keyword arguments."""
        return {k: v for k, v in self.model_dump().items() if k != "type"}


T = TypeVar("T")


class Registry(Generic[T]):
    """name → (config class, implementation) for one kind of component."""

    def __init__(self, kind: str, implementations: Sequence[type[T]]) -> None:
        self.kind = kind
        self._impls: dict[str, type[T]] = {}
        for impl in implementations:
            name = type_name(impl.Config)  # type: ignore[attr-defined]
            if name in self._impls:
                raise ValueError(f"two {kind}s registered as {name!r}")
            self._impls[name] = impl
        configs = tuple(impl.Config for impl in self._impls.values())  # type: ignore[attr-defined]
        union: Any = configs[0] if len(configs) == 1 else Annotated[Union[configs], Field(discriminator="type")]  # noqa: UP007
        self._adapter: TypeAdapter[ComponentConfig] = TypeAdapter(union)

    def names(self) -> list[str]:
        return sorted(self._impls)

    def config(self, spec: BaseModel | Mapping[str, Any] | str) -> ComponentConfig:
        """Validate ``spec`` (a config, a mapping with ``type``, or a bare name) into its registered config."""
        if isinstance(spec, str):
            spec = {"type": spec}
        elif isinstance(spec, BaseModel):
            spec = spec.model_dump()
        name = spec.get("type")
        if name not in self._impls:
            raise ValueError(f"unknown {self.kind} type {name!r}; registered: {', '.join(self.names())}")
        try:
            return self._adapter.validate_python(dict(spec))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}"
                                 for e in exc.errors())
            raise ValueError(f"invalid {self.kind} {name!r}: {problems}") from None

    def build(self, spec: BaseModel | Mapping[str, Any] | str, **context: Any) -> T:
        """The implementation ``spec`` names, constructed from its options and ``context``."""
        config = self.config(spec)
        return self._impls[config.type](**config.options(), **context)


def type_name(config: type[ComponentConfig]) -> str:
    """The registered name of a config class: the default of its ``type`` field."""
    default = config.model_fields["type"].default
    if not isinstance(default, str):
        raise TypeError(f"{config.__name__}.type needs a string default (its registered name)")
    return default
