"""What the pipeline reads from: the :class:`Source` protocol and its records.

Implementations: :class:`~recsift.stream.kafka.KafkaSource` (a consumer group) and
:class:`~recsift.stream.file_source.FileSource` (a file replay). A source never commits on its own; the
pipeline commits offsets after its checkpoint transaction.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol


class SourceRecord(NamedTuple):
    """One message. kafka-python's ConsumerRecord has these fields too and is used as is."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes


class Source(Protocol):
    topic: str

    def poll(self, max_records: int, timeout_ms: int) -> list[SourceRecord]: ...

    def assignment(self) -> set[int]: ...

    def commit(self, offsets: dict[int, int]) -> bool | None:
        """Commit offsets to the broker. True: committed; False: failed (the pipeline counts it; the
        checkpoint still holds the offsets); None: handed on, the outcome is reported later (a fetch
        process reports a failure through its ``on_commit_failure`` callback)."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def lag(self, processed: dict[int, int]) -> dict[int, int]: ...

    def connected(self) -> bool: ...

    def close(self) -> None: ...
