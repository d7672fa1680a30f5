"""Device configs: the shipped ones load; every error names its key and problem."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edge_agent.config import AgentConfig, load_config
from edge_agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# sync.toml is the sync service's config (tests/test_sync_config.py), not a device class.
DEVICE_CONFIGS = sorted(
    p for p in (REPO / "device_configs").glob("*.toml") if p.name != "sync.toml"
)
KEY_HEX = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"
ENV = {"LINESIDE_BROKER_PASSWORD": "s3cret"}


def provision(directory: Path) -> None:
    """The files provisioning puts next to /etc/lineside/agent.toml."""
    (directory / "keys").mkdir(parents=True, exist_ok=True)
    (directory / "keys" / "release-2026.pub").write_text(f"# release key 2026\n{KEY_HEX}\n")
    (directory / "tls").mkdir(exist_ok=True)
    for name in ("plant-ca.crt", "device.crt", "device.key"):
        (directory / "tls" / name).write_text("placeholder\n")


@pytest.mark.parametrize("path", DEVICE_CONFIGS, ids=lambda p: p.stem)
def test_every_device_config_loads(path: Path, tmp_path: Path) -> None:
    provision(tmp_path)
    target = tmp_path / "agent.toml"
    shutil.copy(path, target)
    config = load_config(target, environ=ENV)
    assert isinstance(config, AgentConfig)
    assert config.device_class == path.stem
    assert config.broker.password == "s3cret"
    assert "s3cret" not in repr(config)
    assert config.trusted_keys["release-2026"] == bytes.fromhex(KEY_HEX)
    assert config.models and all(m.fields for m in config.models)
    if config.broker.url.startswith("mqtts://"):
        assert config.broker.tls.ca == tmp_path / "tls" / "plant-ca.crt"


@pytest.mark.parametrize("path", DEVICE_CONFIGS, ids=lambda p: p.stem)
def test_device_configs_load_unprovisioned_for_server_tools(path: Path) -> None:
    # `lineside convert --target device_configs/<class>.toml` runs on a server.
    config = load_config(path, environ={}, provisioned=False)
    assert config.variants and config.broker.password is None
    assert dict(config.trusted_keys) == {}


def test_device_classes_prefer_their_variants() -> None:
    assert len(DEVICE_CONFIGS) >= 3
    for path in DEVICE_CONFIGS:
        text = path.read_text()
        first = text.split("variants = [", 1)[1].split('"')[1]
        assert first == ("onnx-fp32" if "x86" in path.stem else "onnx-int8"), path.name


BASE = f"""
[device]
id = "dev-1"
class = "raspberry-pi-4"
groups = ["line-3"]
state_dir = "state"

[runtime]
variants = ["onnx-int8", "onnx-fp32"]
threads = 2

[broker]
url = "mqtt://127.0.0.1:1883"
password_env = "LINESIDE_BROKER_PASSWORD"

[trusted_keys]
k1 = "{KEY_HEX}"

[limits]
max_payload_bytes = 65536

[batching]
window_ms = 2
max_rows = 64

[[models]]
name = "m1"
input_topics = ["plant/+/sensors"]

[models.fields]
vibration = "press.vibration"
"""


def write(tmp_path: Path, text: str) -> Path:
    provision(tmp_path)
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_minimal_config_defaults_and_relative_paths(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE), environ=ENV)
    assert config.state_dir == tmp_path / "state"
    assert config.broker.client_id == "dev-1" and config.broker.username == "dev-1"
    assert config.topic_root == "lineside"
    assert dict(config.models[0].fields) == {"vibration": "press.vibration"}
    assert config.limits.max_payload_bytes == 65536
    assert config.health.max_error_rate == 0.05


PASSWORD_FILE = BASE.replace('password_env = "LINESIDE_BROKER_PASSWORD"', 'password_file = "pw"')


def password_file(tmp_path: Path, mode: int) -> Path:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    secret.chmod(mode)
    return secret


@pytest.mark.parametrize("mode", [0o600, 0o400], ids=oct)
def test_password_file_is_read(tmp_path: Path, mode: int) -> None:
    password_file(tmp_path, mode)
    assert load_config(write(tmp_path, PASSWORD_FILE), environ={}).broker.password == "from-file"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602], ids=oct)
def test_password_file_readable_or_writable_by_others_is_refused(
    tmp_path: Path, mode: int
) -> None:
    secret = password_file(tmp_path, mode)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, PASSWORD_FILE), environ={})
    assert str(info.value) == (
        f"[broker].password_file: {secret} has mode {mode:04o}; chmod 600 {secret}"
    )
    secret.chmod(0o600)  # the fix the message names
    assert load_config(tmp_path / "agent.toml", environ={}).broker.password == "from-file"


def test_loose_password_file_does_not_affect_the_env_variant_or_server_tools(
    tmp_path: Path,
) -> None:
    password_file(tmp_path, 0o644)  # present but not named: password_env is used
    assert load_config(write(tmp_path, BASE), environ=ENV).broker.password == "s3cret"
    # Unprovisioned (a server tool reading a device's config): secrets are not opened.
    config = load_config(write(tmp_path, PASSWORD_FILE), environ={}, provisioned=False)
    assert config.broker.password is None


def test_literal_password_is_refused(tmp_path: Path) -> None:
    text = BASE.replace('password_env = "LINESIDE_BROKER_PASSWORD"', 'password = "hunter2"')
    with pytest.raises(ConfigError, match=r"^\[broker\]\.password: literal passwords"):
        load_config(write(tmp_path, text), environ=ENV)


ERRORS = [
    (
        'url = "mqtt://127.0.0.1:1883"',
        'url = "foo"',
        "[broker].url: expected mqtt://host:port or mqtts://host:port, got 'foo'",
    ),
    ('url = "mqtt://127.0.0.1:1883"', 'url = "mqtt://h:70000"', "[broker].url: port must be"),
    ('id = "dev-1"\n', "", "[device].id: required key is missing"),
    ('id = "dev-1"', 'id = "bad id!"', "[device].id: 'bad id!' does not match"),
    ("threads = 2", "threads = 0", "[runtime].threads: must be between 1 and 64, got 0"),
    ("threads = 2", 'threads = "2"', "[runtime].threads: expected an integer, got '2'"),
    (
        'variants = ["onnx-int8", "onnx-fp32"]',
        'variants = ["onnx-int4"]',
        "[runtime].variants: unknown variant 'onnx-int4'",
    ),
    ('variants = ["onnx-int8", "onnx-fp32"]', "variants = []", "[runtime].variants: must not be"),
    ('groups = ["line-3"]', 'groups = "line-3"', "[device].groups: expected a list"),
    ("max_rows = 64", "max_rows = 64\nmax_roes = 3", "[batching].max_roes: unknown key"),
    ("max_payload_bytes = 65536", "max_payload_bytes = 1", "[limits].max_payload_bytes: must be"),
    ("window_ms = 2", "window_ms = -1", "[batching].window_ms: must be between"),
    (f'k1 = "{KEY_HEX}"', 'k1 = "keys/missing.pub"', "[trusted_keys].k1: file not found"),
    (f'k1 = "{KEY_HEX}"', 'k1 = "tls/device.crt"', "[trusted_keys].k1: "),
    (f'k1 = "{KEY_HEX}"', "", "[trusted_keys]: at least one trusted public key"),
    (
        'password_env = "LINESIDE_BROKER_PASSWORD"',
        'password_env = "NOPE_UNSET"',
        "[broker].password_env: environment variable NOPE_UNSET is not set",
    ),
    (
        'password_env = "LINESIDE_BROKER_PASSWORD"',
        'password_file = "nope"',
        "[broker].password_file: file not found",
    ),
    (
        'password_env = "LINESIDE_BROKER_PASSWORD"',
        'password_env = "LINESIDE_BROKER_PASSWORD"\n[broker.tls]\nca = "tls/plant-ca.crt"',
        "[broker].url: TLS files are configured but the URL is mqtt://",
    ),
    (
        'password_env = "LINESIDE_BROKER_PASSWORD"',
        'password_env = "LINESIDE_BROKER_PASSWORD"\n[broker.tls]\ncert = "tls/device.crt"',
        "[broker.tls].key: cert and key must be given together",
    ),
    (
        'input_topics = ["plant/+/sensors"]',
        "input_topics = []",
        "[models[0]].input_topics: must not be empty",
    ),
    (
        'input_topics = ["plant/+/sensors"]',
        'input_topics = ["p/s"]\noutput_topic = "out/#"',
        "[models[0]].output_topic: invalid MQTT topic 'out/#'",
    ),
    (
        'vibration = "press.vibration"',
        'vibration = "press..vibration"',
        "[models[0].fields].vibration: invalid field path",
    ),
    (
        'vibration = "press.vibration"',
        "vibration = 3",
        "[models[0].fields].vibration: expected a non-empty string",
    ),
    ("[[models]]", "[[models_]]", "[models]: expected at least one [[models]] table"),
    ("[device]", '[device]\nstate_dir2 = "x"', "[device].state_dir2: unknown key"),
    ("[limits]", "[limits]\nupdate_deadline_s = 0", "[limits].update_deadline_s: must be"),
    ("[batching]", "[batching]\ninline_max_ms = -1", "[batching].inline_max_ms: must be"),
    (
        "[batching]",
        '[batching]\ngroup_predictions = "yes"',
        "[batching].group_predictions: expected true or false",
    ),
    ("[batching]", "[batching]\nmax_queue = 0", "[batching].max_queue: must be"),
    ("[batching]", "[batching]\nmax_queue = 2.5", "[batching].max_queue: expected an integer"),
    ("[batching]", "[batching]\nqueue_wait_ms = -5", "[batching].queue_wait_ms: must be"),
]


@pytest.mark.parametrize(("old", "new", "message"), ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_each_error_names_its_key(tmp_path: Path, old: str, new: str, message: str) -> None:
    assert old in BASE
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, BASE.replace(old, new, 1)), environ=ENV)
    assert str(info.value).startswith(message), str(info.value)


def test_trusted_key_from_a_pem_file(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    public = Ed25519PrivateKey.generate().public_key()
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "k1.pem").write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    config = load_config(
        write(tmp_path, BASE.replace(f'k1 = "{KEY_HEX}"', 'k1 = "keys/k1.pem"')), environ=ENV
    )
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert config.trusted_keys["k1"] == raw


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[device\n"))
