"""Typed, validated reads from one table of a parsed TOML document.

Shared by the device config (``edge_agent.config``, raising ``ConfigError``) and the sync
service's config (``registry_sync.config``, raising ``SyncConfigError``). A subclass sets
``error_type`` (or a caller passes ``error_type=``); every problem is raised as
``error_type("[table].key: problem")`` so the operator can fix the file without reading
code. Keys read are recorded, and ``done()`` rejects the rest: a typo must not silently
fall back to a default. Relative paths resolve against ``base`` (the directory of the file
that names them).

Standard library only: the gateway imports it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Generic, TypeVar

__all__ = ["MISSING", "Table"]

E = TypeVar("E", bound=Exception)
T = TypeVar("T", bound="Table[Any]")

# "No default": the key is required.
MISSING: Any = object()


class Table(Generic[E]):
    """Typed reads from one TOML table; errors name ``[table].key``.

    Class-level settings, fixed per config format:

    - ``error_type``: the exception class raised (a constructor argument overrides it);
    - ``bare_root``: errors on the top-level table (``name == ""``) read ``key: problem``
      instead of ``[].key: problem``;
    - ``unique_lists``: ``str_list`` rejects duplicate entries.

    ``provisioned=False`` validates paths without opening them (a device config read away
    from its device); child tables inherit it.
    """

    error_type: type[E]
    bare_root: bool = False
    unique_lists: bool = True

    def __init__(
        self,
        data: object,
        name: str,
        base: Path,
        *,
        provisioned: bool = True,
        error_type: type[E] | None = None,
    ) -> None:
        if error_type is not None:
            self.error_type = error_type
        if not isinstance(data, dict):
            raise self.error_type(f"[{name}]: expected a table, got {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.name = name
        self.base = base
        self.provisioned = provisioned  # False: do not open the files the config names
        self.used: set[str] = set()

    def error(self, key: str, problem: str) -> E:
        if self.bare_root and not self.name:
            return self.error_type(f"{key}: {problem}")
        return self.error_type(f"[{self.name}].{key}: {problem}")

    def raw(self, key: str, default: Any = MISSING) -> Any:
        self.used.add(key)
        if key in self.data:
            return self.data[key]
        if default is MISSING:
            raise self.error(key, "required key is missing")
        return default

    def text(self, key: str, default: Any = MISSING, pattern: re.Pattern[str] | None = None) -> Any:
        value = self.raw(key, default)
        if default is not MISSING and value is default:
            return value
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a non-empty string, got {value!r}")
        if pattern is not None and not pattern.match(value):
            raise self.error(key, f"{value!r} does not match {pattern.pattern}")
        return value

    def number(
        self, key: str, default: Any, *, low: float, high: float, integer: bool = False
    ) -> Any:
        value = self.raw(key, default)
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise self.error(
                key, f"expected {'an integer' if integer else 'a number'}, got {value!r}"
            )
        if not low <= value <= high:  # exact for ints of any size (no float() overflow)
            raise self.error(key, f"must be between {low:g} and {high:g}, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def str_list(
        self, key: str, default: Any = MISSING, *, non_empty: bool = False
    ) -> tuple[str, ...]:
        value = self.raw(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, f"expected a list of non-empty strings, got {value!r}")
        if non_empty and not value:
            raise self.error(key, "must not be empty")
        if self.unique_lists and len(set(value)) != len(value):
            raise self.error(key, f"has duplicates: {value!r}")
        return tuple(value)

    def path(self, key: str, *, must_exist: bool, default: Any = MISSING) -> Any:
        value = self.text(key, default)
        if value is None:
            return None
        return self.resolve(key, value, must_exist=must_exist)

    def resolve(self, key: str, value: str, *, must_exist: bool) -> Path:
        """``value`` as a path, relative to ``base``; ``must_exist``: a file (checked only
        when provisioned)."""
        path = Path(value).expanduser()
        if not path.is_absolute():
            path = self.base / path
        if must_exist and self.provisioned and not path.is_file():
            raise self.error(key, f"file not found: {path}")
        return path

    def table(self: T, key: str, *, required: bool = False) -> T:
        value = self.raw(key, MISSING if required else {})
        return type(self)(
            value,
            f"{self.name}.{key}" if self.name else key,
            self.base,
            provisioned=self.provisioned,
            error_type=self.error_type,
        )

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key")
