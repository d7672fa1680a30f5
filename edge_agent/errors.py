"""The edge agent's exception tree.

    AgentError                          every error the agent raises
    ├── ConfigError                     a device config is invalid (names key and problem)
    ├── RuntimeLoadError                a model file cannot be loaded by the runtime
    ├── InferenceError                  the runtime failed on an input
    ├── InputError                      a sensor message is malformed or does not fit
    ├── UpdateRejected                  an update was refused (subclasses say why)
    └── BrokerError                     the MQTT broker refused or dropped us

Third-party errors (paho return codes, onnxruntime and LiteRT exceptions) are
translated into these where they are called.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base class of every error the edge agent raises."""


class ConfigError(AgentError):
    """A device configuration is invalid."""


class RuntimeLoadError(AgentError):
    """A model file cannot be loaded by the configured runtime."""


class InferenceError(AgentError):
    """The runtime failed while running a model."""


class InputError(AgentError):
    """A sensor message is malformed, of the wrong type, or misses a field."""

    def __init__(self, reason: str, *, field: str | None = None, kind: str = "bad_input") -> None:
        super().__init__(reason if field is None else f"{field}: {reason}")
        self.field = field
        self.kind = kind
        self.reason = reason


class UpdateRejected(AgentError):  # noqa: N818 - a rejection, reported as an event
    """A model update was refused; ``code`` is a stable machine-readable reason."""

    code = "rejected"


class BrokerError(AgentError):
    """The MQTT broker refused a connection or an operation."""
