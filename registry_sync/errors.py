"""registry_sync's exception tree.

    SyncError                       every error registry_sync raises
    ├── SyncConfigError             sync.toml or a device config is invalid (names the key)
    ├── RegistryUnavailableError    MLflow did not answer or refused a call
    ├── BrokerUnavailableError      the MQTT broker is unreachable or did not acknowledge
    │   └── PublishTimeoutError     a PUBACK did not arrive in time (nothing further sent)
    ├── BuildBlockedError           no variant of a version may be deployed to a group
    │   └── ParityBlockedError      the preferred variant failed the converter's parity gate
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


class ManifestSigningError(SyncError):
    """A signing key cannot be used, or a manifest cannot be signed."""


class StateError(SyncError):
    """The local state directory cannot be read or written."""
