"""sync.toml validation, `lineside keys generate`, the pure desired-state rules, webhook HMAC."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from lineside.cli import cli
from registry_sync.config import DEFAULT_TRACKING_URI, ModelSpec, SyncConfig, load_sync_config
from registry_sync.desired import ModelSnapshot, VersionInfo, desired_state
from registry_sync.errors import SyncConfigError
from registry_sync.signing import load_private_key
from registry_sync.webhook import sign_delivery, verify_delivery
from tests.support.device_sim import write_world

EXAMPLE = Path(__file__).resolve().parent.parent / "device_configs" / "sync.toml"


def test_example_config_loads() -> None:
    config = load_sync_config(EXAMPLE, environ={"LINESIDE_SYNC_BROKER_PASSWORD": "pw"})
    assert config.broker.password == "pw" and config.broker.url.startswith("mqtts://")
    assert [m.name for m in config.models] == ["press-anomaly"]
    assert config.models[0].selector == {"alias": "production"}
    assert {c.name for c in config.build.device_classes} == {
        "raspberry-pi-4",
        "raspberry-pi-5",
        "industrial-pc-x86",
    }
    assert config.rollout.groups[0] == "line-1" and config.rollout.staged
    assert config.fleet.drift_command[0].endswith("lineside-drift-alert")


def _world(tmp_path: Path, **kw: Any) -> Path:
    path, _ = write_world(
        tmp_path, broker_url="mqtt://127.0.0.1:1883", tracking_uri="sqlite:///x.db", model="m", **kw
    )
    return path


def test_defaults(tmp_path: Path) -> None:
    path = _world(tmp_path)
    text = path.read_text().replace('tracking_uri = "sqlite:///x.db"\n', "")
    path.write_text(text)
    config = load_sync_config(path, environ={})
    assert config.tracking_uri == DEFAULT_TRACKING_URI
    assert config.rollout.groups == ("line-1",) and not config.rollout.staged
    assert config.state_dir == tmp_path / "state"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t: t.replace("publish_timeout_s = 10", 'password = "hunter2"'),
            "[broker].password: a literal password is not allowed",
        ),
        (
            lambda t: t.replace("publish_timeout_s = 10", 'password_env = "NOPE_NOT_SET"'),
            "[broker].password_env: environment variable NOPE_NOT_SET is not set",
        ),
        (
            lambda t: t.replace("poll_interval_s = 0.5", 'poll_interval_s = "fast"'),
            "[registry].poll_interval_s: expected a number",
        ),
        (
            lambda t: t.replace("poll_interval_s = 0.5", "pol_interval_s = 1"),
            "[registry].pol_interval_s: unknown key",
        ),
        (
            lambda t: t.replace('url = "mqtt://127.0.0.1:1883"', 'url = "http://x"'),
            "[broker].url: expected mqtt://host:port",
        ),
        (
            lambda t: t.replace('alias = "production"', 'alias = "p"\nstage = "Production"'),
            "[models[0]].stage: set alias or stage, not both",
        ),
        (
            lambda t: t.replace('alias = "production"', 'stage = "Prod"'),
            "[models[0]].stage: expected 'Staging' or 'Production'",
        ),
        (
            lambda t: t.replace(
                'device_configs = ["sim-class.toml"]', 'device_configs = ["missing.toml"]'
            ),
            "[build].device_configs: file not found",
        ),
        (
            lambda t: t.replace("[build.parity]\n", "[build.parity]\nbogus = 1\n"),
            "[build.parity].bogus: unknown parity threshold",
        ),
        (
            lambda t: t.replace('root = "lineside/v1"', 'root = "other"'),
            "[device].topic_root is 'lineside/v1' but [topics].root",
        ),
        (
            lambda t: t.replace("[rollout]\n", '[rollout]\ngroups = ["a", "a"]\n'),
            "[rollout].groups: has duplicates",
        ),
        (
            lambda t: t.replace('[signing]\nkey = "keys/release.pem"\n', "[signing]\n"),
            "[signing].key: required key is missing",
        ),
        (
            lambda t: t + '\n[webhook]\nlisten = "127.0.0.1:8787"\n',
            "[webhook].secret_env: the webhook needs",
        ),
        (lambda t: t.split("[[models]]")[0], "[models]: expected at least one"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, edit: object, message: str) -> None:
    path = _world(tmp_path)
    path.write_text(edit(path.read_text()))  # type: ignore[operator]
    with pytest.raises(SyncConfigError) as err:
        load_sync_config(path, environ={})
    assert message in str(err.value)


def test_config_error_on_the_cli_is_one_line(tmp_path: Path) -> None:
    path = _world(tmp_path)
    path.write_text(path.read_text().replace("publish_timeout_s = 10", 'password = "x"'))
    result = CliRunner().invoke(cli, ["sync", "once", "--config", str(path)])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0
    assert "[broker].password" in result.output
    debug = CliRunner().invoke(cli, ["sync", "once", "--debug", "--config", str(path)])
    assert debug.exit_code != 0 and isinstance(debug.exception, SyncConfigError)


def test_example_config_bounds_the_stage_and_documents_offline_after() -> None:
    config = load_sync_config(EXAMPLE, environ={"LINESIDE_SYNC_BROKER_PASSWORD": "pw"})
    assert config.rollout.stage_timeout_s == 7200 > config.rollout.healthy_for_s
    text = EXAMPLE.read_text()
    fleet = text.split("[fleet]\n", 1)[1].split("\n[", 1)[0]
    assert "# offline_after_s = 60" in fleet
    assert "errors / (rows + errors)" in text


# The two secret files sync.toml may name: the broker password and the webhook secret.
SECRET_KEYS = {"broker": "[broker].password_file", "webhook": "[webhook].secret_file"}


def _with_secret(tmp_path: Path, which: str, mode: int) -> tuple[Path, Path]:
    path = _world(tmp_path)
    text = path.read_text()
    if which == "broker":
        text = text.replace(
            "publish_timeout_s = 10",
            'username = "sync"\npassword_file = "secret"\npublish_timeout_s = 10',
        )
    else:
        text += '\n[webhook]\nlisten = "127.0.0.1:8787"\nsecret_file = "secret"\n'
    path.write_text(text)
    secret = path.resolve().parent / "secret"
    secret.write_text("s3cret\n")
    secret.chmod(mode)
    return path, secret


def _secret_of(config: SyncConfig, which: str) -> str | None:
    if which == "broker":
        return config.broker.password
    assert config.webhook is not None
    return config.webhook.secret


@pytest.mark.parametrize("which", SECRET_KEYS)
@pytest.mark.parametrize("mode", [0o600, 0o400], ids=oct)
def test_secret_files_owner_only_are_read(tmp_path: Path, which: str, mode: int) -> None:
    path, _ = _with_secret(tmp_path, which, mode)
    config = load_sync_config(path, environ={})
    assert _secret_of(config, which) == "s3cret"


@pytest.mark.parametrize("which", SECRET_KEYS)
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o622], ids=oct)
def test_secret_files_readable_or_writable_by_others_are_refused(
    tmp_path: Path, which: str, mode: int
) -> None:
    path, secret = _with_secret(tmp_path, which, mode)
    key = SECRET_KEYS[which]
    with pytest.raises(SyncConfigError) as err:
        load_sync_config(path, environ={})
    assert str(err.value) == f"{key}: {secret} has mode {mode:04o}; chmod 600 {secret}"
    # On the CLI: that one line, nothing published.
    result = CliRunner().invoke(cli, ["sync", "once", "--config", str(path)])
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0
    assert f"chmod 600 {secret}" in result.output
    secret.chmod(0o600)  # the fix the message names
    assert _secret_of(load_sync_config(path, environ={}), which) == "s3cret"


@pytest.mark.parametrize("which", SECRET_KEYS)
def test_secret_env_variants_are_unaffected_by_a_loose_file(tmp_path: Path, which: str) -> None:
    path, _ = _with_secret(tmp_path, which, 0o644)  # left next to the config, not named
    key = "password" if which == "broker" else "secret"
    path.write_text(path.read_text().replace(f'{key}_file = "secret"', f'{key}_env = "SYNC_S"'))
    config = load_sync_config(path, environ={"SYNC_S": "from-env"})
    assert _secret_of(config, which) == "from-env"


@pytest.mark.parametrize(
    ("rollout", "expected"),
    [
        ("", 7200.0),  # healthy_for_s defaults to 300: the 2 h floor
        ("healthy_for_s = 0", 7200.0),
        ("healthy_for_s = 5000", 10000.0),  # twice the health window
        ("healthy_for_s = 5000\nstage_timeout_s = 0", 0.0),  # explicit: wait forever
        ("healthy_for_s = 300\nstage_timeout_s = 301", 301.0),
        ("healthy_for_s = 0\nstage_timeout_s = 60", 60.0),
    ],
)
def test_stage_timeout_default_and_explicit(tmp_path: Path, rollout: str, expected: float) -> None:
    config = load_sync_config(_world(tmp_path, rollout=rollout), environ={})
    assert config.rollout.stage_timeout_s == expected


@pytest.mark.parametrize(
    ("rollout", "message"),
    [
        (
            "healthy_for_s = 300\nstage_timeout_s = 300",
            "[rollout].stage_timeout_s: 300s is not above healthy_for_s (300s)",
        ),
        (
            "stage_timeout_s = 120",  # healthy_for_s defaults to 300
            "[rollout].stage_timeout_s: 120s is not above healthy_for_s (300s)",
        ),
        ("stage_timeout_s = -1", "[rollout].stage_timeout_s: must be between 0 and"),
    ],
)
def test_stage_timeout_the_gate_could_never_meet_is_refused(
    tmp_path: Path, rollout: str, message: str
) -> None:
    with pytest.raises(SyncConfigError) as err:
        load_sync_config(_world(tmp_path, rollout=rollout), environ={})
    assert str(err.value).startswith(message), str(err.value)
    assert "set 0 to wait forever" in str(err.value) or "between" in message


def test_keys_generate_writes_0600_and_prints_the_key_id(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    result = CliRunner().invoke(cli, ["keys", "generate", "--out", str(out), "--name", "rel"])
    assert result.exit_code == 0, result.output
    kid = result.stdout.strip()
    assert len(kid) == 16 and int(kid, 16) >= 0
    private = out / "rel.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    public_hex = (out / "rel.pub").read_text().splitlines()[-1]
    assert len(bytes.fromhex(public_hex)) == 32
    load_private_key(private)  # loads at 0600

    again = CliRunner().invoke(cli, ["keys", "generate", "--out", str(out), "--name", "rel"])
    assert again.exit_code == 1 and "refusing to overwrite" in again.output

    private.chmod(0o640)
    with pytest.raises(Exception, match="chmod 600"):
        load_private_key(private)


def test_desired_state_rules() -> None:
    alias = ModelSpec("m", "alias", "production")
    stage = ModelSpec("s", "stage", "Production")
    snaps = {
        "m": ModelSnapshot("m", True, {"production": 3}, {3: VersionInfo(3), 4: VersionInfo(4)}),
        "s": ModelSnapshot(
            "s",
            True,
            {},
            {
                1: VersionInfo(1, "Production"),
                2: VersionInfo(2, "Production"),
                3: VersionInfo(3, "Staging"),
            },
        ),
    }
    out = desired_state([alias, stage], snaps)
    assert out["m"].version == 3 and out["s"].version == 2 and "highest" in out["s"].note
    snaps["m"] = ModelSnapshot("m", True, {"production": 3}, {3: VersionInfo(3, "Archived")})
    assert desired_state([alias], snaps)["m"].undeploy
    snaps["m"] = ModelSnapshot("m", True, {}, {3: VersionInfo(3)})
    assert desired_state([alias], snaps)["m"].undeploy
    assert desired_state([alias], {})["m"].undeploy


def test_webhook_signature_is_mlflows() -> None:
    from mlflow.webhooks.delivery import _generate_hmac_signature

    body = '{"entity": "model_version_alias", "action": "created"}'
    ours = sign_delivery("s3cret", "d-1", "1700000000", body.encode())
    assert ours == _generate_hmac_signature("s3cret", "d-1", "1700000000", body)
    ok = {
        "signature": ours,
        "delivery_id": "d-1",
        "timestamp": "1700000000",
        "body": body.encode(),
        "max_skew_s": 300,
    }
    assert verify_delivery("s3cret", now=1700000100, **ok)  # type: ignore[arg-type]
    assert not verify_delivery("wrong", now=1700000100, **ok)  # type: ignore[arg-type]
    assert not verify_delivery("s3cret", now=1700009999, **ok)  # type: ignore[arg-type]
    tampered = {**ok, "body": body.encode() + b" "}
    assert not verify_delivery("s3cret", now=1700000100, **tampered)  # type: ignore[arg-type]
