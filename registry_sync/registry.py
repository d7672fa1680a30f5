"""The MLflow boundary: read registry snapshots, write tags. MLflow errors stop here.

Every MLflow exception (``MlflowException``, ``requests`` connection errors, sqlite
errors surfaced by SQLAlchemy) becomes ``RegistryUnavailableError``, except "does not exist",
which is an answer, not a failure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from registry_sync.desired import ModelSnapshot, VersionInfo
from registry_sync.errors import RegistryUnavailableError

__all__ = ["RegistryClient", "mlflow_errors"]

T = TypeVar("T")


@contextlib.contextmanager
def mlflow_errors(what: str) -> Iterator[None]:
    """Translate whatever MLflow (or its transport) raises into ``RegistryUnavailableError``."""
    try:
        yield
    except RegistryUnavailableError:
        raise
    except Exception as exc:  # MLflow raises MlflowException, requests, SQLAlchemy, OSError
        raise RegistryUnavailableError(f"{what}: {type(exc).__name__}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _not_found(exc: BaseException) -> bool:
    code = getattr(exc, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or "RESOURCE_DOES_NOT_EXIST" in str(code)


class RegistryClient:
    """A thin typed facade over ``mlflow.MlflowClient`` for one tracking/registry URI."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            with mlflow_errors("cannot create the MLflow client"):
                from mlflow import MlflowClient

                self._client = MlflowClient(
                    tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri
                )
        return self._client

    def call(self, what: str, func: Callable[[], T]) -> T:
        with mlflow_errors(what):
            return func()

    def snapshot(self, names: Iterable[str]) -> dict[str, ModelSnapshot]:
        return {name: self._snapshot_one(name) for name in names}

    def _snapshot_one(self, name: str) -> ModelSnapshot:
        client = self.client
        try:
            model = client.get_registered_model(name)
        except Exception as exc:
            if _not_found(exc):
                return ModelSnapshot(name, exists=False)
            raise RegistryUnavailableError(
                f"registry at {self.tracking_uri}: {type(exc).__name__}: {_first_line(exc)}"
            ) from exc
        with mlflow_errors(f"listing versions of {name!r}"):
            versions = client.search_model_versions(f"name='{name}'")
        aliases = {str(a): int(v) for a, v in (getattr(model, "aliases", None) or {}).items()}
        infos = {
            int(v.version): VersionInfo(int(v.version), str(v.current_stage or "None"), v.run_id)
            for v in versions
        }
        return ModelSnapshot(name, True, aliases, infos)

    def set_version_tag(self, name: str, version: int, key: str, value: str) -> None:
        with mlflow_errors(f"tagging {name} v{version}"):
            self.client.set_model_version_tag(name, str(version), key, value[:5000])

    def version_tags(self, name: str, version: int) -> dict[str, str]:
        with mlflow_errors(f"reading tags of {name} v{version}"):
            mv = self.client.get_model_version(name, str(version))
        return dict(mv.tags or {})
