"""Versioned adapter directories with an atomically updated ``current`` pointer.

Layout under the registry root::

    v0001/  adapter_config.json, adapter_model.safetensors (peft save_pretrained), recsift.json (metadata)
    v0002/  ...
    current  (a one-line file naming the serving version; replaced atomically with os.replace)
    history  (one JSON line per pointer change, for rollback)

A version is written into a hidden temporary directory and renamed into place, so a crash mid-save
leaves no half version; the pointer only ever names complete versions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_VERSION = re.compile(r"^v(\d{4,})$")


def version_number(name: str | None) -> int:
    """``v0007`` → 7; None (the base model) or a name that is not a registry version → 0."""
    m = _VERSION.match(name or "")
    return int(m.group(1)) if m else 0


class AdapterNotFound(LookupError):
    """An adapter version that is not in the registry (or no earlier version to roll back to)."""


@dataclass(frozen=True)
class AdapterVersion:
    name: str
    path: Path
    metadata: dict[str, Any]


def check_backend(version: AdapterVersion | None, backend: str) -> None:
    """Refuse a version another backend wrote (a version without the field is a BIGRec adapter: the first
    backend)."""
    if version is None:
        return
    wrote = version.metadata.get("backend", "bigrec")
    if wrote != backend:
        raise ValueError(f"the serving version {version.name} is a {wrote} model and trainer.backend is {backend}: "
                         f"set trainer.backend to {wrote!r}, or start a new registry (a new state directory)")


class AdapterRegistry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def versions(self) -> list[AdapterVersion]:
        out = []
        for p in sorted(self.root.iterdir()):
            if _VERSION.match(p.name) and (p / "recsift.json").is_file():
                out.append(AdapterVersion(p.name, p, json.loads((p / "recsift.json").read_text())))
        return out

    def get(self, name: str) -> AdapterVersion:
        for v in self.versions():
            if v.name == name:
                return v
        raise AdapterNotFound(f"no adapter version {name!r} in {self.root}")

    def save(self, write: Callable[[Path], None], metadata: dict[str, Any]) -> AdapterVersion:
        """Write a new version: ``write(tmpdir)`` saves the adapter (``model.save_pretrained``)."""
        existing = [int(m.group(1)) for p in self.root.iterdir() if (m := _VERSION.match(p.name))]
        name = f"v{(max(existing) + 1) if existing else 1:04d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.root))
        try:
            write(tmp)
            (tmp / "recsift.json").write_text(json.dumps({**metadata, "version": name, "saved_at": time.time()},
                                                         indent=2, default=str))
            os.rename(tmp, self.root / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.get(name)

    def discard_partial(self) -> list[str]:
        """Remove what a writer killed mid-save left behind (hidden temp dirs, a pointer temp file).
        Call only where no refresh is running (service start), since a running save writes there."""
        leftovers = [p for p in self.root.iterdir() if p.name.startswith(".v") or p.name == ".current.tmp"]
        for p in leftovers:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        return [p.name for p in leftovers]

    def pointer(self) -> str | None:
        """The name ``current`` holds (one small read: ``recsift serve`` checks it before every batch)."""
        try:
            return (self.root / "current").read_text().strip() or None
        except FileNotFoundError:
            return None

    def current(self) -> AdapterVersion | None:
        name = self.pointer()
        return self.get(name) if name is not None else None

    def promote(self, name: str, reason: str = "promote") -> AdapterVersion:
        version = self.get(name)
        previous = self.current()
        tmp = self.root / ".current.tmp"
        tmp.write_text(name + "\n")
        os.replace(tmp, self.root / "current")
        with (self.root / "history").open("a") as fh:
            fh.write(json.dumps({"at": time.time(), "from": previous.name if previous else None, "to": name,
                                 "reason": reason}) + "\n")
        return version

    def last_change(self) -> dict[str, Any] | None:
        """The newest pointer change (``{"at", "from", "to", "reason"}``), or None."""
        history = self.root / "history"
        lines = history.read_text().splitlines() if history.is_file() else []
        return json.loads(lines[-1]) if lines else None

    def rollback(self) -> AdapterVersion:
        """Point ``current`` back at the version served before the current one."""
        history = self.root / "history"
        changes = [json.loads(line) for line in history.read_text().splitlines()] if history.is_file() else []
        current = self.current()
        previous = next((c["to"] for c in reversed(changes) if current is None or c["to"] != current.name), None)
        if current is None or previous is None:
            raise AdapterNotFound("nothing to roll back to")
        return self.promote(previous, reason=f"rollback from {current.name}")
