"""The demo's exceptions: one tree, each reported as one line by ``lineside demo``."""

from __future__ import annotations


class DemoError(Exception):
    """Base of every error the demo reports without a traceback."""


class DemoFailedError(DemoError):
    """A step did not happen as described (or not within its time budget)."""


class DemoConfigError(DemoError):
    """The device config the demo derives its agent's config from is unusable."""


class BrokerStartError(DemoError, RuntimeError):
    """The demo's MQTT broker could not be started."""
