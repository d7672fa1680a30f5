"""The device configuration: one TOML file, loaded and validated once at start.

Every problem is reported as ``ConfigError("[table].key: problem")`` so the operator can
fix the file without reading code. Unknown keys are errors too (a typo must not silently
fall back to a default). Relative paths resolve against the config file's directory.

Secrets never live in the file: the broker password comes from ``password_file`` or the
environment variable named by ``password_env`` (systemd ``EnvironmentFile=``); a literal
``password`` key is rejected, and so is a ``password_file`` that group or others may read
or write (``secret_file_problem``, shared with ``registry_sync.config``).

See ``device_configs/*.toml`` for complete examples.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 gateways: tomli if it is installed, else a clear error
    try:
        import tomli as tomllib
    except ImportError:
        tomllib = None

from edge_agent.errors import ConfigError
from edge_agent.tomlcheck import Table

__all__ = [
    "VARIANTS",
    "AgentConfig",
    "BatchingConfig",
    "BrokerConfig",
    "HealthConfig",
    "Limits",
    "ModelConfig",
    "TlsConfig",
    "load_config",
    "secret_file_problem",
]

# Variant names the converter produces: "<format>-<precision>".
VARIANTS = ("onnx-fp32", "onnx-fp16", "onnx-int8", "tflite-fp32", "tflite-fp16", "tflite-int8")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TOPIC_FORBIDDEN = ("#", "+", "\x00")
_HEX_KEY = re.compile(r"^[0-9a-fA-F]{64}$")
# DER SubjectPublicKeyInfo header of an Ed25519 key (RFC 8410): 12 bytes, then the key.
_ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
# Group/other read or write bits: a secret file with any of them set is refused (as
# registry_sync.signing refuses a loose private key); execute bits alone leak nothing.
_SECRET_LOOSE_BITS = stat.S_IRGRP | stat.S_IWGRP | stat.S_IROTH | stat.S_IWOTH


@dataclass(frozen=True)
class TlsConfig:
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True)
class BrokerConfig:
    url: str
    client_id: str
    username: str | None
    password: str | None = field(repr=False)  # resolved from password_file/password_env
    tls: TlsConfig
    keepalive_s: int = 30


@dataclass(frozen=True)
class ModelConfig:
    name: str
    input_topics: tuple[str, ...]
    fields: Mapping[str, str]  # feature name <- JSON field path ("press.vibration")
    output_topic: str | None = None


@dataclass(frozen=True)
class Limits:
    max_model_bytes: int = 64 * 1024 * 1024  # bytes
    outbox_max_bytes: int = 256 * 1024 * 1024  # bytes
    max_payload_bytes: int = 256 * 1024  # bytes, one sensor message
    update_deadline_s: float = 600.0  # seconds for a whole model update
    # Seconds one updater step may run (a chunk write, verify, install, load, smoke test,
    # activate, the health check): past it the update is abandoned and its version not
    # retried; past twice it the agent reports unhealthy so systemd restarts it.
    step_deadline_s: float = 300.0
    # Outbox commits: "full" survives a power cut (one fsync per micro-batch), "normal"
    # survives a crashed or killed agent but may lose the last commits on a power cut.
    outbox_sync: str = "full"


@dataclass(frozen=True)
class HealthConfig:
    window_s: float = 300.0
    max_error_rate: float = 0.05  # fraction of rows
    latency_budget_ms: float = 50.0  # p99


@dataclass(frozen=True)
class BatchingConfig:
    window_ms: float = 2.0
    max_rows: int = 64
    # A lone message runs on the MQTT thread (no hand-off) while the recent inference
    # calls took under this long; 0 always hands it to the batch worker.
    inline_max_ms: float = 5.0
    # The answers of one micro-batch go out as one predictions message (protocol 8.4).
    group_predictions: bool = True
    # Rows received and not yet answered, at most (memory bound). A full queue makes the
    # MQTT thread wait (TCP back-pressure on the broker) up to queue_wait_ms, then the
    # row is refused as "overload" and left unacknowledged.
    max_queue: int = 1_000
    queue_wait_ms: float = 1000.0


@dataclass(frozen=True)
class AgentConfig:
    source: Path
    device_id: str
    device_class: str
    groups: tuple[str, ...]
    state_dir: Path
    topic_root: str
    variants: tuple[str, ...]
    runtime_threads: int
    broker: BrokerConfig
    trusted_keys: Mapping[str, bytes]  # key id -> raw 32-byte public key
    models: tuple[ModelConfig, ...]
    limits: Limits = Limits()
    health: HealthConfig = HealthConfig()
    telemetry_interval_s: float = 10.0
    batching: BatchingConfig = BatchingConfig()


class _Table(Table[ConfigError]):
    """Typed reads from one TOML table; errors name ``[table].key`` (``edge_agent.tomlcheck``)."""

    error_type = ConfigError


def load_config(
    path: Path, *, environ: Mapping[str, str] | None = None, provisioned: bool = True
) -> AgentConfig:
    """Read and validate ``path``; raises ``ConfigError`` naming the key and the problem.

    ``provisioned=False`` reads a config away from its device (``lineside convert
    --target raspberry-pi-4.toml`` on a server): the structure is validated but the files
    it names are not opened and secrets are not resolved, so ``broker.password`` is None
    and ``trusted_keys`` holds only the keys given inline as hex.
    """
    environ = os.environ if environ is None else environ
    path = Path(path)
    if tomllib is None:  # pragma: no cover - Python 3.10 without tomli
        raise ConfigError(f"{path}: reading TOML on Python 3.10 needs: pip install tomli")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    root = _Table(data, "", path.resolve().parent, provisioned=provisioned)
    config = _parse(root, path.resolve(), environ)
    root.done()
    return config


def _parse(root: _Table, source: Path, environ: Mapping[str, str]) -> AgentConfig:
    device = root.table("device", required=True)
    device_id = device.text("id", pattern=_NAME)
    device_class = device.text("class", pattern=_NAME)
    groups = device.str_list("groups", [])
    for group in groups:
        if not _NAME.match(group):
            raise device.error("groups", f"{group!r} does not match {_NAME.pattern}")
    state_dir = device.path("state_dir", must_exist=False)
    topic_root = device.text("topic_root", "lineside")
    _check_topic(device, "topic_root", topic_root)
    device.done()

    runtime = root.table("runtime", required=True)
    variants = runtime.str_list("variants", non_empty=True)
    for variant in variants:
        if variant not in VARIANTS:
            raise runtime.error("variants", f"unknown variant {variant!r}; "
                                            f"expected some of {', '.join(VARIANTS)}")
    threads = runtime.number("threads", 1, low=1, high=64, integer=True)
    runtime.done()

    return AgentConfig(
        source=source,
        device_id=device_id,
        device_class=device_class,
        groups=groups,
        state_dir=state_dir,
        topic_root=topic_root,
        variants=variants,
        runtime_threads=threads,
        broker=_broker(root.table("broker", required=True), device_id, environ),
        trusted_keys=_trusted_keys(root.table("trusted_keys", required=True)),
        models=_models(root),
        limits=_limits(root.table("limits")),
        health=_health(root.table("health")),
        telemetry_interval_s=_telemetry(root.table("telemetry")),
        batching=_batching(root.table("batching")),
    )


def _check_topic(table: _Table, key: str, topic: str, *, wildcards: bool = False) -> None:
    forbidden = ("\x00",) if wildcards else _TOPIC_FORBIDDEN
    if any(c in topic for c in forbidden) or topic.startswith("/") or topic.endswith("/"):
        raise table.error(key, f"invalid MQTT topic {topic!r}")


def _broker(table: _Table, device_id: str, environ: Mapping[str, str]) -> BrokerConfig:
    from edge_agent.mqtt import parse_broker_url  # keeps paho out of config-only tools

    url = table.text("url")
    try:
        tls_scheme, _host, _port = parse_broker_url(url)
    except ValueError as exc:
        raise table.error("url", str(exc)) from exc
    if "password" in table.data:
        raise table.error("password", "literal passwords are not allowed in the config; "
                                      "use password_file or password_env")
    password_file = table.path("password_file", must_exist=True, default=None)
    password_env = table.text("password_env", None)
    if password_file is not None and password_env is not None:
        raise table.error("password_env", "set password_file or password_env, not both")
    password = None
    if not table.provisioned:
        pass  # secrets stay on the device
    elif password_file is not None:
        problem = secret_file_problem(password_file)
        if problem:
            raise table.error("password_file", problem)
        password = password_file.read_text(encoding="utf-8").strip()
        if not password:
            raise table.error("password_file", f"{password_file} is empty")
    elif password_env is not None:
        password = environ.get(password_env)
        if not password:
            raise table.error("password_env", f"environment variable {password_env} is not set")
    tls_table = table.table("tls")
    tls = TlsConfig(
        ca=tls_table.path("ca", must_exist=True, default=None),
        cert=tls_table.path("cert", must_exist=True, default=None),
        key=tls_table.path("key", must_exist=True, default=None),
    )
    if (tls.cert is None) != (tls.key is None):
        raise tls_table.error("key" if tls.key is None else "cert",
                              "cert and key must be given together")
    if not tls_scheme and (tls.ca or tls.cert):
        raise table.error("url", "TLS files are configured but the URL is mqtt://; "
                                 "use mqtts://")
    tls_table.done()
    broker = BrokerConfig(
        url=url,
        client_id=table.text("client_id", device_id, pattern=_NAME),
        username=table.text("username", device_id),
        password=password,
        tls=tls,
        keepalive_s=table.number("keepalive_s", 30, low=5, high=3600, integer=True),
    )
    table.done()
    return broker


def secret_file_problem(path: Path) -> str | None:
    """Why the secret file ``path`` must not be used, or None: one actionable line (with the
    ``chmod`` that fixes it) when group or others may read or write it. Checked before the
    secret is read: a password other local users can read is already leaked."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & _SECRET_LOOSE_BITS:
        return f"{path} has mode {mode:04o}; chmod 600 {path}"
    return None


def _trusted_keys(table: _Table) -> Mapping[str, bytes]:
    keys: dict[str, bytes] = {}
    for key_id in list(table.data):
        if not _NAME.match(key_id):
            raise table.error(key_id, f"key id must match {_NAME.pattern}")
        value = table.text(key_id)
        if _HEX_KEY.match(value):
            keys[key_id] = bytes.fromhex(value)
            continue
        path = table.path(key_id, must_exist=True)
        if table.provisioned:
            keys[key_id] = _read_raw_key(table, key_id, path)
    if not table.data:
        raise ConfigError("[trusted_keys]: at least one trusted public key is required")
    table.done()
    return MappingProxyType(keys)


def _read_raw_key(table: _Table, key_id: str, path: Path) -> bytes:
    """A 32-byte Ed25519 public key: 32 raw bytes, 64 hex digits ('#' comments allowed),
    or the PEM ``openssl pkey -pubout`` writes (a fixed 12-byte SPKI prefix + the key)."""
    data = path.read_bytes()
    if len(data) == 32:
        return data
    lines = [ln.strip() for ln in data.decode("ascii", "replace").splitlines()]
    text = "".join(ln for ln in lines if ln and not ln.startswith(("#", "-----")))
    if _HEX_KEY.match(text):
        return bytes.fromhex(text)
    if b"-----BEGIN PUBLIC KEY-----" in data:
        with contextlib.suppress(binascii.Error):
            der = base64.b64decode(text, validate=True)
            if len(der) == 44 and der.startswith(_ED25519_SPKI_PREFIX):
                return der[12:]
    raise table.error(key_id, f"{path} holds no Ed25519 public key (32 raw bytes, "
                              "64 hex digits or a PEM public key)")


def _models(root: _Table) -> tuple[ModelConfig, ...]:
    raw = root.raw("models")
    if not isinstance(raw, list) or not raw:
        raise ConfigError("[models]: expected at least one [[models]] table")
    models = []
    for index, item in enumerate(raw):
        table = _Table(item, f"models[{index}]", root.base, provisioned=root.provisioned)
        name = table.text("name", pattern=_NAME)
        topics = table.str_list("input_topics", non_empty=True)
        for topic in topics:
            _check_topic(table, "input_topics", topic, wildcards=True)
        output = table.text("output_topic", None)
        if output is not None:
            _check_topic(table, "output_topic", output)
        fields_table = table.table("fields", required=True)
        fields = {}
        for feature in list(fields_table.data):
            path = fields_table.text(feature)
            if any(not part for part in path.split(".")):
                raise fields_table.error(feature, f"invalid field path {path!r}")
            fields[feature] = path
        if not fields:
            raise table.error("fields", "map at least one feature to a JSON field")
        fields_table.done()
        table.done()
        models.append(ModelConfig(name, topics, MappingProxyType(fields), output))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ConfigError(f"[models]: duplicate model names in {names}")
    return tuple(models)


def _limits(table: _Table) -> Limits:
    d = Limits()
    limits = Limits(
        max_model_bytes=table.number("max_model_bytes", d.max_model_bytes, low=1024,
                                     high=2**34, integer=True),
        outbox_max_bytes=table.number("outbox_max_bytes", d.outbox_max_bytes, low=65536,
                                      high=2**40, integer=True),
        max_payload_bytes=table.number("max_payload_bytes", d.max_payload_bytes, low=64,
                                       high=256 * 2**20, integer=True),
        update_deadline_s=float(table.number("update_deadline_s", d.update_deadline_s,
                                             low=1, high=86400)),
        step_deadline_s=float(table.number("step_deadline_s", d.step_deadline_s,
                                           low=1, high=86400)),
        outbox_sync=_choice(table, "outbox_sync", d.outbox_sync, ("full", "normal")),
    )
    table.done()
    return limits


def _choice(table: _Table, key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = table.text(key, default)
    if value not in allowed:
        raise table.error(key, f"expected one of {', '.join(allowed)}, got {value!r}")
    return str(value)


def _health(table: _Table) -> HealthConfig:
    d = HealthConfig()
    health = HealthConfig(
        window_s=float(table.number("window_s", d.window_s, low=1, high=86400)),
        max_error_rate=float(table.number("max_error_rate", d.max_error_rate, low=0, high=1)),
        latency_budget_ms=float(table.number("latency_budget_ms", d.latency_budget_ms,
                                             low=0.01, high=60_000)),
    )
    table.done()
    return health


def _telemetry(table: _Table) -> float:
    interval = float(table.number("interval_s", 10.0, low=0.1, high=86400))
    table.done()
    return interval


def _batching(table: _Table) -> BatchingConfig:
    d = BatchingConfig()
    batching = BatchingConfig(
        window_ms=float(table.number("window_ms", d.window_ms, low=0, high=1000)),
        max_rows=table.number("max_rows", d.max_rows, low=1, high=100_000, integer=True),
        inline_max_ms=float(
            table.number("inline_max_ms", d.inline_max_ms, low=0, high=1000)
        ),
        group_predictions=table.boolean("group_predictions", d.group_predictions),
        max_queue=table.number("max_queue", d.max_queue, low=1, high=10_000_000, integer=True),
        queue_wait_ms=float(
            table.number("queue_wait_ms", d.queue_wait_ms, low=0, high=60_000)
        ),
    )
    table.done()
    return batching
