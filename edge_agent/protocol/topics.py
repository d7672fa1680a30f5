"""The MQTT topic tree (docs/protocol.md, "Topics").

    {root}/manifests/{group}/{model}       retained signed manifest        QoS 1
    {root}/chunks/{sha256}                  retained content-addressed chunk QoS 1
    {root}/devices/{device}/state           retained device state + will    QoS 1
    {root}/devices/{device}/telemetry       QoS 0
    {root}/devices/{device}/predictions     QoS 0 (or 1 from the outbox)
    {root}/devices/{device}/events          QoS 1
    {root}/devices/{device}/cmd             QoS 1, not retained

Ids are single topic levels: 1..64 characters, none of ``+ # /``, NUL or other
control characters, and no leading ``$`` (brokers reserve ``$`` topics).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "DEFAULT_ROOT",
    "DEVICE_CHANNELS",
    "MAX_ID_LENGTH",
    "ParsedTopic",
    "TopicError",
    "Topics",
    "validate_id",
]

DEFAULT_ROOT = "lineside/v1"
MAX_ID_LENGTH = 64
DEVICE_CHANNELS = ("state", "telemetry", "predictions", "events", "cmd")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class TopicError(ValueError):
    """An id or topic that is not valid in lineside's tree."""


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it can be one topic level, else raise ``TopicError``."""
    if not isinstance(value, str) or not value:
        raise TopicError(f"{what} must be a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise TopicError(f"{what} is longer than {MAX_ID_LENGTH} characters")
    if value.startswith("$"):
        raise TopicError(f"{what} must not start with '$'")
    for ch in value:
        if ch in "+#/" or ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise TopicError(f"{what} contains a forbidden character {ch!r}")
    return value


def _validate_root(root: str) -> str:
    if not root or root.startswith("/") or root.endswith("/"):
        raise TopicError("root must be non-empty without leading or trailing '/'")
    for level in root.split("/"):
        validate_id(level, "root level")
    return root


@dataclass(frozen=True)
class ParsedTopic:
    """A topic taken apart: ``kind`` is manifest, chunk or a device channel."""

    kind: str
    group: str | None = None
    model: str | None = None
    sha256: str | None = None
    device: str | None = None


@dataclass(frozen=True)
class Topics:
    """Builds and parses topics under one root (default ``lineside/v1``)."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        _validate_root(self.root)

    def manifest(self, group: str, model: str) -> str:
        return f"{self.root}/manifests/{validate_id(group, 'group')}/{validate_id(model, 'model')}"

    def manifests_filter(self, group: str | None = None) -> str:
        """Subscription filter for every manifest, or every one of ``group``."""
        g = "+" if group is None else validate_id(group, "group")
        return f"{self.root}/manifests/{g}/+"

    def chunk(self, sha256: str) -> str:
        if not _SHA256.fullmatch(sha256):
            raise TopicError("chunk id must be 64 lower-case hex characters")
        return f"{self.root}/chunks/{sha256}"

    def device(self, device_id: str, channel: str) -> str:
        if channel not in DEVICE_CHANNELS:
            raise TopicError(f"unknown device channel {channel!r}")
        return f"{self.root}/devices/{validate_id(device_id, 'device')}/{channel}"

    def state(self, device_id: str) -> str:
        return self.device(device_id, "state")

    def telemetry(self, device_id: str) -> str:
        return self.device(device_id, "telemetry")

    def predictions(self, device_id: str) -> str:
        return self.device(device_id, "predictions")

    def events(self, device_id: str) -> str:
        return self.device(device_id, "events")

    def cmd(self, device_id: str) -> str:
        return self.device(device_id, "cmd")

    def parse(self, topic: str) -> ParsedTopic:
        """Take a topic apart; ``TopicError`` if it is not in this tree."""
        prefix = self.root + "/"
        if not topic.startswith(prefix):
            raise TopicError(f"topic {topic!r} is not under {self.root!r}")
        levels = topic[len(prefix) :].split("/")
        try:
            if levels[0] == "manifests" and len(levels) == 3:
                return ParsedTopic(
                    "manifest",
                    group=validate_id(levels[1], "group"),
                    model=validate_id(levels[2], "model"),
                )
            if levels[0] == "chunks" and len(levels) == 2 and _SHA256.fullmatch(levels[1]):
                return ParsedTopic("chunk", sha256=levels[1])
            if levels[0] == "devices" and len(levels) == 3 and levels[2] in DEVICE_CHANNELS:
                return ParsedTopic(levels[2], device=validate_id(levels[1], "device"))
        except TopicError as exc:
            raise TopicError(f"topic {topic!r}: {exc}") from exc
        raise TopicError(f"topic {topic!r} is not a lineside topic")
