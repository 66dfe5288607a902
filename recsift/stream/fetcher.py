"""Kafka consumption in a child process, so record decoding runs in parallel with the pipeline.

kafka-python decodes every record (and checks batch CRCs) in Python, which costs about as much per event as
recsift's own validation and windowing; both hold the GIL, so threads cannot overlap them. The child runs
an ordinary :class:`~recsift.stream.sources.KafkaSource`; the parent proxies the same Source protocol over
a pipe and keeps one poll request outstanding, so the child fetches batch N+1 while the parent processes
batch N.

The commit protocol is unchanged: the child never commits on its own. Rebalance callbacks in the child are
round trips to the parent, which handles them between batches (every record handed out so far is then
fully processed), checkpoints on revoke, and answers with the offsets to seek to on assign.

Wire format (our own framing, no pickle): one message per ``send_bytes``, a one-byte kind, then either
JSON or, for record batches, a JSON header and records framed as ``<iqii`` (partition, offset, key length
or -1, value length or -1) followed by the key and value bytes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import signal
import struct
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from recsift.config import StreamConfig
from recsift.process import die_with_parent
from recsift.stream.kafka import KafkaSource, consumer_timeouts
from recsift.stream.sources import SourceRecord

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<iqii")
# child → parent
BATCH, ASSIGN, REVOKE, COMMITTED, CLOSED, ERROR = b"B", b"A", b"R", b"c", b"X", b"E"
# parent → child
POLL, ASSIGNED, REVOKED, COMMIT, PAUSE, RESUME, CLOSE = b"P", b"a", b"r", b"C", b"Z", b"U", b"Q"


POLL_GRACE_S = 2.0  # beyond the poll timeout, how long the parent waits for a batch before looping on
CLOSE_TIMEOUT_S = 30.0


class FetcherError(RuntimeError):
    """The fetch process failed or died; the pipeline stops without checkpointing past it."""


def encode_records(records: list[Any]) -> bytes:
    pack = _HEADER.pack
    parts: list[bytes] = []
    append = parts.append
    for r in records:
        key, value = r.key, r.value
        append(pack(r.partition, r.offset, -1 if key is None else len(key), -1 if value is None else len(value)))
        if key:
            append(key)
        if value:
            append(value)
    return b"".join(parts)


def decode_records(buf: bytes, start: int = 0) -> list[SourceRecord]:
    unpack, size = _HEADER.unpack_from, _HEADER.size
    out: list[SourceRecord] = []
    append = out.append
    pos, end = start, len(buf)
    while pos < end:
        partition, offset, klen, vlen = unpack(buf, pos)
        pos += size
        key = None
        if klen >= 0:
            key = buf[pos : pos + klen]
            pos += klen
        value = b""
        if vlen > 0:
            value = buf[pos : pos + vlen]
            pos += vlen
        append(SourceRecord(partition, offset, key, value))
    return out


def _child_main(conn: Connection, cfg: StreamConfig, embedded: bool) -> None:
    """The fetch process: a KafkaSource driven by the parent's requests."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    die_with_parent()
    logging.basicConfig(level=logging.WARNING)
    # kafka-python's event-loop timing notes ("Task ... ran for 0.438s") are nothing a user can act on
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)

    def send_json(kind: bytes, obj: Any) -> None:
        conn.send_bytes(kind + json.dumps(obj).encode())

    source: KafkaSource | None = None
    close_requested = False

    def handle_commit(msg: bytes) -> None:
        assert source is not None
        offsets = {int(p): int(o) for p, o in json.loads(msg[1:]).items()}
        conn.send_bytes(COMMITTED + (b"1" if source.commit(offsets) else b"0"))

    def serve_until(expected: bytes) -> bytes:
        """Wait for the parent's answer inside a rebalance callback, serving what may arrive before it."""
        nonlocal close_requested
        assert source is not None
        while True:
            msg = conn.recv_bytes()
            kind = msg[:1]
            if kind == expected:
                return msg
            if kind == COMMIT:
                handle_commit(msg)  # asynchronous inside a listener
            elif kind == PAUSE:
                source.pause()
            elif kind == RESUME:
                source.resume()
            elif kind == CLOSE:
                close_requested = True
            else:
                raise FetcherError(f"unexpected message {kind!r} inside a rebalance callback")

    def on_assign(partitions: set[int]) -> dict[int, int]:
        send_json(ASSIGN, sorted(partitions))
        reply = serve_until(ASSIGNED)
        return {int(p): int(o) for p, o in json.loads(reply[1:]).items()}

    def on_revoke(partitions: set[int], lost: bool) -> None:
        send_json(REVOKE, {"partitions": sorted(partitions), "lost": lost})
        serve_until(REVOKED)  # meanwhile the parent checkpoints, which commits

    try:
        source = KafkaSource(cfg, embedded, on_assign, on_revoke)
        while True:
            msg = CLOSE if close_requested else conn.recv_bytes()
            kind = msg[:1]
            if kind == POLL:
                max_records, timeout_ms = json.loads(msg[1:])
                records = source.poll(max_records, timeout_ms)
                consumer = source.consumer
                meta: dict[str, Any] = {"assignment": sorted(source.assignment()), "high": {}, "position": {},
                                        "connected": source.connected()}
                for tp in consumer.assignment():
                    high = consumer.highwater(tp)
                    if high is not None:
                        meta["high"][tp.partition] = high
                        meta["position"][tp.partition] = consumer.position(tp)
                head = json.dumps(meta).encode()
                conn.send_bytes(BATCH + struct.pack("<I", len(head)) + head + encode_records(records))
            elif kind == COMMIT:
                handle_commit(msg)
            elif kind == PAUSE:
                source.pause()
            elif kind == RESUME:
                source.resume()
            elif kind == CLOSE:
                source.close()
                conn.send_bytes(CLOSED)
                return
            else:
                raise FetcherError(f"unknown request {kind!r}")
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the parent is gone; its checkpoint's offsets are the truth
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send_bytes(ERROR + traceback.format_exc().encode())
        raise


class ProcessKafkaSource:
    """The parent-side proxy: the Source protocol of the pipeline, backed by a fetch process."""

    def __init__(
        self,
        cfg: StreamConfig,
        embedded: bool,
        on_assign: Callable[[set[int]], dict[int, int]],
        on_revoke: Callable[[set[int], bool], None],
        on_commit_failure: Callable[[], None] | None = None,
    ) -> None:
        self.topic = cfg.topic
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._on_commit_failure = on_commit_failure
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_child_main, args=(child, cfg, embedded), name="recsift-fetch", daemon=True)
        self.process.start()
        child.close()
        self._outstanding = False
        self._request = (cfg.poll_max_records, cfg.poll_timeout_ms)
        self._assignment: set[int] = set()
        self._high: dict[int, int] = {}
        self._position: dict[int, int] = {}
        self._connected = False
        self._last_batch = time.monotonic()
        # no batch for this long means the child is stuck on the broker (an outage), whatever it last said
        session_ms = consumer_timeouts(cfg, embedded)["session_timeout_ms"]
        self._stall_s = (session_ms + cfg.poll_timeout_ms) / 1000.0 + POLL_GRACE_S
        self.paused = False
        self.closed = False

    def _send(self, kind: bytes, obj: Any = None) -> None:
        self.conn.send_bytes(kind + (json.dumps(obj).encode() if obj is not None else b""))

    def _recv(self, deadline: float | None = None) -> bytes | None:
        """The child's next message; None when ``deadline`` (monotonic) passes first."""
        while not self.conn.poll(1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))):
            if not self.process.is_alive():
                raise FetcherError(f"the fetch process died (exit code {self.process.exitcode})")
            if deadline is not None and time.monotonic() >= deadline:
                return None
        try:
            return self.conn.recv_bytes()
        except (EOFError, OSError) as exc:
            raise FetcherError(f"the fetch process closed its pipe ({type(exc).__name__})") from None

    def _handle(self, msg: bytes) -> list[SourceRecord] | None:
        """Act on one message from the child; return records when it was a batch."""
        kind = msg[:1]
        if kind == BATCH:
            (hlen,) = struct.unpack_from("<I", msg, 1)
            meta = json.loads(msg[5 : 5 + hlen])
            self._assignment = set(meta["assignment"])
            self._high = {int(p): h for p, h in meta["high"].items()}
            self._position = {int(p): h for p, h in meta["position"].items()}
            self._connected = bool(meta["connected"])
            self._last_batch = time.monotonic()
            return decode_records(msg, 5 + hlen)
        if kind == ASSIGN:
            partitions = set(json.loads(msg[1:]))
            self._assignment |= partitions
            self._send(ASSIGNED, {str(p): o for p, o in self._on_assign(partitions).items()})
        elif kind == REVOKE:
            req = json.loads(msg[1:])
            partitions = set(req["partitions"])
            self._on_revoke(partitions, req["lost"])
            self._assignment -= partitions
            self._send(REVOKED)
        elif kind == COMMITTED:
            if msg[1:] != b"1" and self._on_commit_failure is not None:
                self._on_commit_failure()
        elif kind == ERROR:
            raise FetcherError("the fetch process failed:\n" + msg[1:].decode(errors="replace"))
        elif kind != CLOSED:
            raise FetcherError(f"unexpected message {kind!r} from the fetch process")
        return None

    def poll(self, max_records: int, timeout_ms: int) -> list[SourceRecord]:
        """The next batch. Returns [] (the request stays outstanding) when the child has not answered
        within the poll timeout plus a grace period, so a broker outage never stalls the ingest loop."""
        self._request = (max_records, timeout_ms)
        if not self._outstanding:
            self._send(POLL, self._request)
            self._outstanding = True
        deadline = time.monotonic() + timeout_ms / 1000.0 + POLL_GRACE_S
        while True:
            msg = self._recv(deadline)
            if msg is None:
                return []
            records = self._handle(msg)
            if records is not None:
                # ask for the next batch at once: the child fetches it while we process this one
                self._send(POLL, self._request)
                return records

    def assignment(self) -> set[int]:
        return set(self._assignment)

    def commit(self, offsets: dict[int, int]) -> bool | None:
        """Sent to the child: None (the outcome comes back later; a failure is reported through
        ``on_commit_failure``), or False when the fetch process is gone and nothing was sent."""
        if self.closed:
            return False
        self._send(COMMIT, {str(p): o for p, o in offsets.items()})
        return None

    def pause(self) -> None:
        self.paused = True
        self._send(PAUSE)

    def resume(self) -> None:
        self.paused = False
        self._send(RESUME)

    def lag(self, processed: dict[int, int]) -> dict[int, int]:
        return {
            p: max(0, high - processed.get(p, self._position.get(p, high)))
            for p, high in self._high.items()
            if p in self._assignment
        }

    def connected(self) -> bool:
        """Whether the child's consumer reached the broker within the session timeout at its last poll,
        and that poll answered recently."""
        return self._connected and time.monotonic() - self._last_batch < self._stall_s

    def close(self) -> None:
        """Close the consumer in the child (its revoke callback comes back here first), then reap it."""
        if self.closed:
            return
        try:
            self._send(CLOSE)
            deadline = time.monotonic() + CLOSE_TIMEOUT_S
            while True:
                msg = self._recv(deadline)
                if msg is None:
                    raise FetcherError(f"no answer to close within {CLOSE_TIMEOUT_S:.0f} s (is the broker down?)")
                if msg[:1] == CLOSED:
                    break
                self._handle(msg)  # a prefetched batch is dropped: the checkpoint's offsets are the truth
        except (FetcherError, OSError) as exc:
            log.warning("fetch process did not close cleanly: %s", exc)
        finally:
            self.closed = True
            self.conn.close()
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout=5)
