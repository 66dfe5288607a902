"""Replay of a file as a one-partition source (``recsift run --input``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

from recsift.stream.sources import SourceRecord


class FileSource:
    """Replays a file as partition 0; the offset is the record's index in the file.

    The source is handed its reader (``payloads``: a fresh iterator of raw messages from the start, for
    example :func:`recsift.data.datasets.iter_payloads` of the file), so the stream layer knows no dataset
    format. Partition 0 is "assigned" at the first poll, so the pipeline restores its checkpoint the same
    way as for a Kafka partition and the replay resumes at the checkpoint's offset.
    """

    def __init__(
        self,
        path: str | Path,
        payloads: Callable[[], Iterator[bytes]],
        on_assign: Callable[[set[int]], dict[int, int]],
    ) -> None:
        self._on_assign = on_assign
        self._payloads = payloads
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"input {self.path} does not exist")
        self.topic = f"file:{self.path.resolve()}"
        self._iter: Iterator[bytes] | None = None
        self._offset = 0
        self.exhausted = False
        self.paused = False

    def _start(self) -> None:
        """Position at the checkpoint's offset (records before it are skipped, not re-read as events)."""
        target = self._on_assign({0}).get(0, 0)
        self._iter = self._payloads()
        while self._offset < target and next(self._iter, None) is not None:
            self._offset += 1

    def poll(self, max_records: int, timeout_ms: int) -> list[SourceRecord]:
        if self._iter is None:
            self._start()
        assert self._iter is not None
        out = []
        if not self.paused:
            for payload in self._iter:
                out.append(SourceRecord(0, self._offset, None, payload))
                self._offset += 1
                if len(out) >= max_records:
                    break
        if not out and not self.paused:
            self.exhausted = True
            time.sleep(timeout_ms / 1000.0)
        return out

    def assignment(self) -> set[int]:
        return {0}

    def commit(self, offsets: dict[int, int]) -> bool:
        return True  # a file has no broker: the checkpoint's offsets are all there is

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def lag(self, processed: dict[int, int]) -> dict[int, int]:
        return {}

    def connected(self) -> bool:
        return True  # a local file is always there

    def close(self) -> None:
        self._iter = None
