"""registry_sync's exception tree.

    SyncError                       every error registry_sync raises
    ├── SyncConfigError             sync.toml or a device config is invalid (names the key)
    ├── RegistryUnavailableError    MLflow did not answer or refused a call
    ├── BrokerUnavailableError      the MQTT broker is unreachable or did not acknowledge
    │   └── PublishTimeoutError     a PUBACK did not arrive in time (nothing further sent)
    ├── BuildBlockedError           no variant of a version may be deployed to a group
    │   └── ParityBlockedError      the preferred variant failed the converter's parity gate
    ├── BuildRetryError             a conversion failed for a reason that may pass (retried later)
    ├── ManifestSigningError        a key cannot be loaded or a manifest cannot be signed
    └── StateError                  the local state dir cannot be read or written

MLflow exceptions, ``edge_agent.errors.BrokerError`` (paho, via MqttLink) and
``registry_sync.signing.SigningError`` are translated into these where they are called,
so the service loop and the CLI handle exactly this tree.
"""

from __future__ import annotations

__all__ = [
    "BrokerUnavailableError",
    "BuildBlockedError",
    "BuildRetryError",
    "ManifestSigningError",
    "ParityBlockedError",
    "PublishTimeoutError",
    "RegistryUnavailableError",
    "StateError",
    "SyncConfigError",
    "SyncError",
]


class SyncError(Exception):
    """Base class of every error registry_sync raises."""


class SyncConfigError(SyncError):
    """The sync configuration (or a device config it reads) is invalid."""


class RegistryUnavailableError(SyncError):
    """The MLflow tracking/registry server cannot be reached or refused a call."""


class BrokerUnavailableError(SyncError):
    """The MQTT broker cannot be reached, or dropped us mid-operation."""


class PublishTimeoutError(BrokerUnavailableError):
    """A QoS 1 publish was not acknowledged within the configured timeout."""


class BuildBlockedError(SyncError):
    """No deployable variant exists for a (model version, group)."""


class ParityBlockedError(BuildBlockedError):
    """The variant the group needs failed the parity gate: the deployment is blocked."""


class BuildRetryError(SyncError):
    """A conversion failed for a reason that may pass (model not downloadable or loadable,
    registry or disk error, an unexpected exception); it is retried after ``retry_at``.

    ``attempted`` is False when this pass did not try at all (still backing off), so the
    failure is reported once per attempt, not once per pass.
    """

    def __init__(self, message: str, *, retry_at: float, attempted: bool) -> None:
        super().__init__(message)
        self.retry_at = retry_at
        self.attempted = attempted


class ManifestSigningError(SyncError):
    """A signing key cannot be used, or a manifest cannot be signed."""


class StateError(SyncError):
    """The local state directory cannot be read or written."""
