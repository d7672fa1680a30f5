"""The broker boundary: read back retained manifests, publish chunks and manifests.

Order of a publish (docs/protocol.md section 6): every chunk retained at QoS 1 and every
PUBACK awaited (bounded), and only then the manifest, also retained at QoS 1. A timeout
raises ``PublishTimeoutError`` before the manifest is sent, so a device never sees a
manifest whose chunks are not all on the broker. Chunks are content-addressed, so
publishing one twice is harmless.

Read-back: subscribing to ``manifests/+/+`` makes the broker send every retained
manifest; a probe message published right after on our own topic arrives after them
(the broker handles one client's packets in order), which tells us the read-back is
complete without guessing a quiet period.

``edge_agent.errors.BrokerError`` (the link's error) becomes ``BrokerUnavailableError`` here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import BrokerError, UpdateRejected
from edge_agent.mqtt import Message, MqttLink, PublishHandle
from edge_agent.protocol.ed25519 import PublicKey
from edge_agent.protocol.manifest import decode_envelope, parse_signed, verify_envelope
from edge_agent.protocol.topics import TopicError, Topics
from registry_sync.errors import BrokerUnavailableError, PublishTimeoutError

__all__ = ["Publisher", "RetainedManifest", "events_topic"]

log = logging.getLogger(__name__)


def events_topic(topics: Topics) -> str:
    return f"{topics.root}/sync/events"


@dataclass(frozen=True)
class RetainedManifest:
    group: str
    model: str
    wire: bytes
    sequence: int  # -1 when the payload is not a well-formed manifest
    signed: Mapping[str, Any] | None  # only when signed by one of our keys


class Publisher:
    def __init__(
        self,
        link: MqttLink,
        topics: Topics,
        trusted: Mapping[str, PublicKey],
        timeout_s: float,
    ) -> None:
        self.link = link
        self.topics = topics
        self.trusted = trusted
        self.timeout_s = timeout_s
        self.sent_messages = 0  # publishes we made (tests check idempotency with it)

    # ---- read-back -----------------------------------------------------------------

    def read_manifests(self) -> dict[tuple[str, str], RetainedManifest]:
        found: dict[tuple[str, str], RetainedManifest] = {}
        lock = threading.Lock()
        done = threading.Event()
        nonce = uuid.uuid4().hex.encode()
        probe = f"{self.topics.root}/sync/probe/{self.link.options.client_id}"
        manifests = self.topics.manifests_filter()

        def on_manifest(msg: Message) -> None:
            if done.is_set():
                return
            try:
                parsed = self.topics.parse(msg.topic)
            except TopicError:
                return
            if parsed.group is None or parsed.model is None:
                return
            key = (parsed.group, parsed.model)
            with lock:
                if not msg.payload:
                    found.pop(key, None)  # a cleared topic
                else:
                    found[key] = self._decode(parsed.group, parsed.model, msg.payload)

        def on_probe(msg: Message) -> None:
            if msg.payload == nonce:
                done.set()

        with _broker_errors("reading back retained manifests"):
            self.link.subscribe(probe, on_probe, qos=1)
            self.link.subscribe(manifests, on_manifest, qos=1)
            self.link.publish(probe, nonce, qos=1)
        try:
            if not done.wait(self.timeout_s):
                raise PublishTimeoutError(
                    f"read-back of retained manifests did not finish in {self.timeout_s:g}s"
                )
        finally:
            done.set()
            with _broker_errors("unsubscribing"):
                self.link.unsubscribe(manifests)
        with lock:
            return dict(found)

    def _decode(self, group: str, model: str, payload: bytes) -> RetainedManifest:
        try:
            envelope = decode_envelope(payload)
            sequence = envelope.signed.get("sequence")
            seq = sequence if isinstance(sequence, int) and not isinstance(sequence, bool) else -1
        except UpdateRejected:
            return RetainedManifest(group, model, payload, -1, None)
        try:
            verify_envelope(envelope, self.trusted)
            parse_signed(envelope.signed)
        except UpdateRejected as exc:
            log.warning("retained manifest for %s/%s is not ours (%s)", group, model, exc)
            return RetainedManifest(group, model, payload, seq, None)
        return RetainedManifest(group, model, payload, seq, envelope.signed)

    # ---- publishing ------------------------------------------------------------------

    def publish_chunks(self, chunks: Mapping[str, bytes]) -> None:
        handles = []
        with _broker_errors("publishing chunks"):
            for cid, data in chunks.items():
                handles.append(self.link.publish(self.topics.chunk(cid), data, qos=1, retain=True))
                self.sent_messages += 1
        self._await(handles, "chunk")

    def publish_manifest(self, group: str, model: str, wire: bytes) -> None:
        with _broker_errors(f"publishing the manifest for {group}/{model}"):
            handle = self.link.publish(self.topics.manifest(group, model), wire, qos=1, retain=True)
            self.sent_messages += 1
        self._await([handle], "manifest")

    def clear_chunks(self, ids: Iterable[str]) -> None:
        handles = []
        with _broker_errors("clearing stale chunks"):
            for cid in ids:
                handles.append(self.link.publish(self.topics.chunk(cid), b"", qos=1, retain=True))
                self.sent_messages += 1
        self._await(handles, "chunk clear")

    def publish_event(self, event: Mapping[str, Any]) -> None:
        """Best effort: an event that cannot be sent is logged, never fatal."""
        body = {"ts": time.time(), **event}
        try:
            self.link.publish(events_topic(self.topics), json.dumps(body, sort_keys=True), qos=1)
        except BrokerError as exc:
            log.warning("could not publish sync event %s: %s", body.get("code"), exc)

    def _await(self, handles: list[PublishHandle], what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        for handle in handles:
            if not handle.wait(max(0.0, deadline - time.monotonic())):
                raise PublishTimeoutError(
                    f"no PUBACK for {what} {handle.topic} within "
                    f"{self.timeout_s:g}s; nothing further was published"
                )


@contextlib.contextmanager
def _broker_errors(what: str) -> Iterator[None]:
    try:
        yield
    except BrokerError as exc:
        raise BrokerUnavailableError(f"{what}: {exc}") from exc
