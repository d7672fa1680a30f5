"""``sync.toml``: the sync service's configuration, loaded and validated once.

Every problem is a ``SyncConfigError("[table].key: problem")``; unknown keys are errors
(a typo must not silently fall back to a default). Relative paths resolve against the
directory of the file that names them. The broker password comes from ``password_file``
or the environment variable named by ``password_env``; a literal ``password`` is refused,
and so is a secret file (``password_file``, ``[webhook].secret_file``) that group or others
may read or write.

Device class configs (``device_configs/*.toml``) are read for three keys only:
``[device].class``, ``[device].groups`` and ``[runtime].variants`` (plus
``[device].topic_root``, checked against ours). ``edge_agent.config.load_config`` is not
used because it resolves the device's broker password and trusted-key files, which do
not exist on the sync host.

See ``device_configs/sync.toml`` for a complete example.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from edge_agent.config import secret_file_problem
from edge_agent.tomlcheck import Table
from registry_sync.errors import SyncConfigError

__all__ = [
    "DEFAULT_TRACKING_URI",
    "BrokerSettings",
    "BuildSettings",
    "DeviceClass",
    "FleetSettings",
    "ModelSpec",
    "RolloutSettings",
    "SyncConfig",
    "WebhookSettings",
    "load_sync_config",
]

# MLflow's own default when nothing is configured: a sqlite file in the working dir.
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class BrokerSettings:
    url: str
    client_id: str = "lineside-sync"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    publish_timeout_s: float = 30.0  # per batch of PUBACKs
    connect_timeout_s: float = 10.0


@dataclass(frozen=True)
class ModelSpec:
    name: str
    selector_kind: str  # "alias" | "stage"
    selector_value: str
    on_undeploy: str = "keep"  # keep | stop: what devices do with an undeployed model

    @property
    def selector(self) -> dict[str, str]:
        return {self.selector_kind: self.selector_value}


@dataclass(frozen=True)
class DeviceClass:
    name: str
    variants: tuple[str, ...]  # preference order
    groups: tuple[str, ...]
    source: Path


@dataclass(frozen=True)
class BuildSettings:
    device_classes: tuple[DeviceClass, ...]
    chunk_size: int = 65536  # bytes
    calibration_data: Path | None = None
    parity: Mapping[str, float] = field(default_factory=dict)  # ParityThresholds overrides
    expires_after_s: int = 0  # 0: manifests never expire
    cache_dir: Path | None = None  # converted bundles; default <state dir>/cache


@dataclass(frozen=True)
class RolloutSettings:
    groups: tuple[str, ...]  # in order; the first is the canary
    min_devices: int = 1
    healthy_for_s: float = 300.0
    max_error_rate: float = 0.01  # failed / attempted rows (errors / (rows + errors))
    # The gate fails if it has not held this long after the stage started; 0: wait forever
    # (explicit only: sync.toml without the key gets max(7200, 2 * healthy_for_s)).
    stage_timeout_s: float = 0.0
    revert_on_failure: bool = True
    staged: bool = True  # False: every group at once (no gate)


@dataclass(frozen=True)
class FleetSettings:
    drift_psi_threshold: float = 0.2
    drift_command: tuple[str, ...] = ()
    drift_command_timeout_s: float = 30.0
    offline_after_s: float = 0.0  # 0: trust the device's retained state / will only
    history: bool = True  # write deployment history and telemetry into MLflow


@dataclass(frozen=True)
class WebhookSettings:
    host: str
    port: int
    secret: str = field(repr=False)
    max_skew_s: float = 300.0


@dataclass(frozen=True)
class SyncConfig:
    source: Path | None
    tracking_uri: str
    poll_interval_s: float
    broker: BrokerSettings
    signing_key: Path
    extra_signing_keys: tuple[Path, ...]
    topic_root: str
    state_dir: Path
    models: tuple[ModelSpec, ...]
    build: BuildSettings
    rollout: RolloutSettings
    fleet: FleetSettings = FleetSettings()
    webhook: WebhookSettings | None = None
    retry_max_s: float = 300.0
    http_timeout_s: float = 10.0  # one MLflow REST request
    http_retries: int = 2  # MLflow's own retries per request (its default, 7, takes minutes)

    @property
    def groups(self) -> tuple[str, ...]:
        return self.rollout.groups


class _Table(Table[SyncConfigError]):
    """Typed reads from one TOML table; errors name ``[table].key`` (``edge_agent.tomlcheck``);
    the top-level table's read ``key: problem``; lists may repeat entries (a command line)."""

    error_type = SyncConfigError
    bare_root = True
    unique_lists = False


def load_sync_config(path: Path, *, environ: Mapping[str, str] | None = None) -> SyncConfig:
    """Read and validate ``path``; raises ``SyncConfigError`` naming the key and the problem."""
    environ = os.environ if environ is None else environ
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SyncConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SyncConfigError(f"{path}: invalid TOML: {exc}") from exc
    root = _Table(data, "", path.resolve().parent)
    config = _parse(root, path.resolve(), environ)
    root.done()
    return config


def _parse(root: _Table, source: Path, environ: Mapping[str, str]) -> SyncConfig:
    from edge_agent.protocol.topics import DEFAULT_ROOT, TopicError, Topics

    registry = root.table("registry")
    tracking_uri = (
        registry.text("tracking_uri", None)
        or environ.get("MLFLOW_TRACKING_URI")
        or DEFAULT_TRACKING_URI
    )
    poll = float(registry.number("poll_interval_s", 30.0, low=0.1, high=86400))
    retry_max = float(registry.number("retry_max_s", 300.0, low=0.1, high=86400))
    http_timeout = float(registry.number("http_timeout_s", 10.0, low=0.1, high=3600))
    http_retries = registry.number("http_retries", 2, low=0, high=20, integer=True)
    registry.done()

    topics = root.table("topics")
    topic_root = topics.text("root", DEFAULT_ROOT)
    try:
        Topics(topic_root)
    except TopicError as exc:
        raise topics.error("root", str(exc)) from exc
    topics.done()

    signing = root.table("signing", required=True)
    key = signing.path("key", must_exist=False)
    extra = tuple(
        signing.resolve("extra_keys", p, must_exist=False)
        for p in signing.str_list("extra_keys", [])
    )
    expires = signing.number("expires_after_s", 0, low=0, high=10 * 365 * 86400, integer=True)
    signing.done()

    state = root.table("state")
    state_dir = state.path("dir", must_exist=False, default=None) or (source.parent / "sync-state")
    state.done()

    build = _build(root.table("build", required=True), topic_root, expires)
    models = _models(root)
    rollout = _rollout(root.table("rollout"), build.device_classes)
    return SyncConfig(
        source=source,
        tracking_uri=tracking_uri,
        poll_interval_s=poll,
        broker=_broker(root.table("broker", required=True), environ),
        signing_key=key,
        extra_signing_keys=extra,
        topic_root=topic_root,
        state_dir=state_dir,
        models=models,
        build=build,
        rollout=rollout,
        fleet=_fleet(root.table("fleet")),
        webhook=_webhook(root.table("webhook"), environ),
        retry_max_s=retry_max,
        http_timeout_s=http_timeout,
        http_retries=http_retries,
    )


def _secret(table: _Table, environ: Mapping[str, str], what: str) -> str | None:
    if what in table.data:
        raise table.error(
            what, f"a literal {what} is not allowed in the config; use {what}_file or {what}_env"
        )
    from_file = table.path(f"{what}_file", must_exist=True, default=None)
    env_name = table.text(f"{what}_env", None)
    if from_file is not None and env_name is not None:
        raise table.error(f"{what}_env", f"set {what}_file or {what}_env, not both")
    if from_file is not None:
        problem = secret_file_problem(from_file)
        if problem:
            raise table.error(f"{what}_file", problem)
        value = from_file.read_text(encoding="utf-8").strip()
        if not value:
            raise table.error(f"{what}_file", f"{from_file} is empty")
        return str(value)
    if env_name is not None:
        value = environ.get(env_name)
        if not value:
            raise table.error(f"{what}_env", f"environment variable {env_name} is not set")
        return value
    return None


def _broker(table: _Table, environ: Mapping[str, str]) -> BrokerSettings:
    from edge_agent.mqtt import parse_broker_url

    url = table.text("url")
    try:
        tls, _host, _port = parse_broker_url(url)
    except ValueError as exc:
        raise table.error("url", str(exc)) from exc
    password = _secret(table, environ, "password")
    tls_table = table.table("tls")
    ca = tls_table.path("ca", must_exist=True, default=None)
    cert = tls_table.path("cert", must_exist=True, default=None)
    key = tls_table.path("key", must_exist=True, default=None)
    tls_table.done()
    if (cert is None) != (key is None):
        raise tls_table.error(
            "key" if key is None else "cert", "cert and key must be given together"
        )
    if not tls and (ca or cert):
        raise table.error("url", "TLS files are configured but the URL is mqtt://; use mqtts://")
    settings = BrokerSettings(
        url=url,
        client_id=table.text("client_id", "lineside-sync", pattern=_NAME),
        username=table.text("username", None),
        password=password,
        ca=ca,
        cert=cert,
        key=key,
        publish_timeout_s=float(table.number("publish_timeout_s", 30.0, low=0.1, high=3600)),
        connect_timeout_s=float(table.number("connect_timeout_s", 10.0, low=0.1, high=600)),
    )
    if settings.password is not None and settings.username is None:
        raise table.error("username", "a password is configured without a username")
    table.done()
    return settings


def _build(table: _Table, topic_root: str, expires: int) -> BuildSettings:
    from converter.parity import ParityThresholds
    from converter.variants import VARIANTS

    paths = table.str_list("device_configs", non_empty=True)
    classes: dict[str, DeviceClass] = {}
    for raw in paths:
        path = table.resolve("device_configs", raw, must_exist=True)
        dc = _device_class(path, topic_root, VARIANTS)
        if dc.name in classes and classes[dc.name].variants != dc.variants:
            raise table.error(
                "device_configs",
                f"device class {dc.name!r} appears in "
                f"{classes[dc.name].source} and {path} with "
                "different variant preferences",
            )
        classes.setdefault(dc.name, dc)
    parity = table.table("parity")
    known = set(ParityThresholds.__dataclass_fields__)
    overrides: dict[str, float] = {}
    for name in list(parity.data):
        if name not in known:
            raise parity.error(name, f"unknown parity threshold; known: {', '.join(sorted(known))}")
        overrides[name] = float(parity.number(name, 0.0, low=0.0, high=1e9))
    parity.done()
    settings = BuildSettings(
        device_classes=tuple(classes.values()),
        chunk_size=table.number("chunk_size", 65536, low=256, high=128 * 1024, integer=True),
        calibration_data=table.path("calibration_data", must_exist=True, default=None),
        parity=overrides,
        expires_after_s=expires,
        cache_dir=table.path("cache_dir", must_exist=False, default=None),
    )
    table.done()
    return settings


def _device_class(path: Path, topic_root: str, known: tuple[str, ...]) -> DeviceClass:
    where = f"{path}"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SyncConfigError(f"[build].device_configs: {where}: {exc}") from exc
    device = data.get("device", {})
    runtime = data.get("runtime", {})
    name = device.get("class")
    if not isinstance(name, str) or not _NAME.match(name):
        raise SyncConfigError(f"{where}: [device].class: expected a class name, got {name!r}")
    variants = runtime.get("variants")
    if not isinstance(variants, list) or not variants or not all(v in known for v in variants):
        raise SyncConfigError(
            f"{where}: [runtime].variants: expected some of {', '.join(known)}, got {variants!r}"
        )
    groups = device.get("groups", [])
    if not isinstance(groups, list) or not all(
        isinstance(g, str) and _NAME.match(g) for g in groups
    ):
        raise SyncConfigError(f"{where}: [device].groups: expected a list of group ids")
    root = device.get("topic_root", "lineside")
    if root != topic_root:
        raise SyncConfigError(
            f"{where}: [device].topic_root is {root!r} but [topics].root of "
            f"the sync config is {topic_root!r}; devices would never see "
            "the manifests"
        )
    return DeviceClass(name, tuple(variants), tuple(groups), path)


def _models(root: _Table) -> tuple[ModelSpec, ...]:
    raw = root.raw("models", [])
    if not isinstance(raw, list) or not raw:
        raise SyncConfigError("[models]: expected at least one [[models]] table")
    specs: list[ModelSpec] = []
    for index, item in enumerate(raw):
        table = _Table(item, f"models[{index}]", root.base)
        name = table.text("name", pattern=_NAME)
        alias = table.text("alias", None)
        stage = table.text("stage", None)
        if alias is not None and stage is not None:
            raise table.error("stage", "set alias or stage, not both")
        if stage is not None and stage not in ("Staging", "Production"):
            raise table.error("stage", f"expected 'Staging' or 'Production', got {stage!r}")
        on_undeploy = table.text("on_undeploy", "keep")
        if on_undeploy not in ("keep", "stop"):
            raise table.error("on_undeploy", f"expected 'keep' or 'stop', got {on_undeploy!r}")
        table.done()
        kind, value = ("stage", stage) if stage is not None else ("alias", alias or "production")
        specs.append(ModelSpec(name, kind, value, on_undeploy))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SyncConfigError(f"[models]: duplicate model names in {names}")
    return tuple(specs)


def _rollout(table: _Table, classes: tuple[DeviceClass, ...]) -> RolloutSettings:
    default_groups: list[str] = []
    for dc in classes:
        default_groups += [g for g in dc.groups if g not in default_groups]
    groups = table.str_list("groups", default_groups)
    if not groups:
        raise table.error("groups", "no groups: list them here or in the device configs")
    for group in groups:
        if not _NAME.match(group):
            raise table.error("groups", f"{group!r} does not match {_NAME.pattern}")
    if len(set(groups)) != len(groups):
        raise table.error("groups", f"has duplicates: {list(groups)!r}")
    healthy_for = float(table.number("healthy_for_s", 300.0, low=0, high=30 * 86400))
    # Absent: a bound, so a canary group that never turns healthy fails the rollout
    # visibly instead of holding it silently; 0 stays the explicit "wait forever". The cap is
    # twice healthy_for_s's, so a valid timeout exists for every health window.
    timeout = float(
        table.number(
            "stage_timeout_s", max(7200.0, 2 * healthy_for), low=0, high=60 * 86400
        )
    )
    if 0 < timeout <= healthy_for:
        raise table.error(
            "stage_timeout_s",
            f"{timeout:g}s is not above healthy_for_s ({healthy_for:g}s): the gate could "
            "never hold in time; raise it, or set 0 to wait forever",
        )
    settings = RolloutSettings(
        groups=tuple(groups),
        min_devices=table.number("min_devices", 1, low=0, high=1_000_000, integer=True),
        healthy_for_s=healthy_for,
        max_error_rate=float(table.number("max_error_rate", 0.01, low=0, high=1)),
        stage_timeout_s=timeout,
        revert_on_failure=table.boolean("revert_on_failure", True),
        staged=table.boolean("staged", "groups" in table.data),
    )
    table.done()
    return settings


def _fleet(table: _Table) -> FleetSettings:
    command = table.str_list("drift_command", [])
    settings = FleetSettings(
        drift_psi_threshold=float(table.number("drift_psi_threshold", 0.2, low=0, high=100)),
        drift_command=command,
        drift_command_timeout_s=float(
            table.number("drift_command_timeout_s", 30.0, low=0.1, high=3600)
        ),
        offline_after_s=float(table.number("offline_after_s", 0.0, low=0, high=86400)),
        history=table.boolean("history", True),
    )
    table.done()
    return settings


def _webhook(table: _Table, environ: Mapping[str, str]) -> WebhookSettings | None:
    if not table.data:
        return None
    listen = table.text("listen")
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise table.error("listen", f"expected host:port, got {listen!r}")
    secret = _secret(table, environ, "secret")
    if secret is None:
        raise table.error(
            "secret_env",
            "the webhook needs secret_file or secret_env (MLflow signs deliveries with it)",
        )
    settings = WebhookSettings(
        host=host,
        port=int(port),
        secret=secret,
        max_skew_s=float(table.number("max_skew_s", 300.0, low=1, high=86400)),
    )
    table.done()
    return settings
