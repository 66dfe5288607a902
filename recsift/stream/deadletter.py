"""Dead letters: every rejected input, with its reason, where it came from and its raw payload, written to
a JSON-lines file or a Kafka topic. ``flush`` makes them durable and runs before each checkpoint, so a
checkpoint never covers a rejection that was not written."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import IO, Any, Protocol

from recsift.config import StreamConfig
from recsift.stream.events import Rejection
from recsift.stream.kafka import kafka_client_config


def dead_letter_record(rejection: Rejection, source: dict[str, Any]) -> dict[str, Any]:
    """The JSON form of a dead letter: reason, detail, where it came from and the raw payload."""
    record: dict[str, Any] = {
        "reason": rejection.reason.value,
        "detail": rejection.detail,
        "source": source,
        "rejected_at": time.time(),
    }
    try:
        record["payload"] = rejection.payload.decode("utf-8")
    except UnicodeDecodeError:
        record["payload_b64"] = base64.b64encode(rejection.payload).decode()
    return record


def dead_letter_payload(record: dict[str, Any]) -> bytes:
    """The original raw payload of a dead-letter record."""
    if "payload_b64" in record:
        return base64.b64decode(record["payload_b64"])
    return record["payload"].encode("utf-8")


class DeadLetterSink(Protocol):
    def write(self, rejection: Rejection, source: dict[str, Any], key: bytes | None) -> None: ...

    def flush(self) -> None:
        """Make every written record durable; called before each checkpoint."""

    def close(self) -> None: ...


class FileDeadLetterSink:
    """Appends dead letters as JSON lines; ``flush`` fsyncs so a checkpoint never outruns them."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[str] = self.path.open("a", encoding="utf-8")

    def write(self, rejection: Rejection, source: dict[str, Any], key: bytes | None) -> None:
        self._fh.write(json.dumps(dead_letter_record(rejection, source), ensure_ascii=False) + "\n")

    def flush(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self.flush()
            self._fh.close()


class DeadLetterError(RuntimeError):
    """Dead letters could not be made durable; the checkpoint must not advance past them."""


class KafkaDeadLetterSink:
    """Produces dead letters to a topic, keyed like the original message; ``flush`` waits for every ack."""

    def __init__(self, cfg: StreamConfig, embedded: bool) -> None:
        from kafka import KafkaProducer

        self.topic = cfg.dead_letter_topic
        self.producer = KafkaProducer(
            **kafka_client_config(cfg, embedded), acks="all", linger_ms=5, max_request_size=4 << 20, retries=5
        )
        self._futures: list[Any] = []

    def write(self, rejection: Rejection, source: dict[str, Any], key: bytes | None) -> None:
        value = json.dumps(dead_letter_record(rejection, source), ensure_ascii=False).encode()
        self._futures.append(self.producer.send(self.topic, key=key, value=value))

    def flush(self) -> None:
        self.producer.flush()
        failed = [f.exception for f in self._futures if f.failed()]
        self._futures = []
        if failed:
            raise DeadLetterError(f"{len(failed)} dead letters were not written to {self.topic}: {failed[0]!r}")

    def close(self) -> None:
        self.flush()
        self.producer.close()
