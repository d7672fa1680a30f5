"""registry_sync's security paths with real parts (issue #4).

- Key rotation, followed step by step as docs/operations.md section 9 writes it: keys made
  by ``lineside keys generate``, passes run by ``lineside sync once``, real agents
  (``edge_agent.agent.Agent`` on a real Mosquitto) whose ``[trusted_keys]`` name the
  ``.pub`` files, restarted when their config changes.
- The MLflow webhook endpoint over real HTTP: only a verified delivery wakes the loop.
- The sync service against a Mosquitto with TLS and password (or client-certificate)
  auth, and the one-line errors a wrong password or CA gives.
- ``lineside keys generate`` / key loading cases test_sync_config.py does not cover.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from edge_agent.agent import Agent
from edge_agent.config import load_config
from edge_agent.mqtt import LinkOptions, Message, MqttLink
from edge_agent.protocol.ed25519 import PublicKey, key_id
from edge_agent.protocol.manifest import decode_envelope, verify_envelope
from edge_agent.protocol.predictions import iter_predictions
from edge_agent.updater import State
from lineside.cli import cli
from registry_sync import signing
from registry_sync.config import load_sync_config
from registry_sync.manifests import VOLATILE
from registry_sync.service import SyncService
from registry_sync.webhook import MAX_BODY, WebhookServer, sign_delivery
from tests.support.broker import MosquittoBroker, make_tls_files, running_broker
from tests.support.device_sim import (
    SHARED_MODEL,
    Collector,
    log_versions,
    shared_cache_dir,
    write_world,
)
from tests.support.registry import Registry

ROOT = "lineside/v1"
GROUP = "line-1"
SENSORS = "plant/rotation/+/sensors"


# ---- helpers ------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env)


def sync_once(config: Path, env: dict[str, str] | None = None) -> Result:
    return run_cli("sync", "once", "--config", str(config), "--settle", "0", env=env)


def generate(out: Path, name: str) -> str:
    result = run_cli("keys", "generate", "--out", str(out), "--name", name)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def public_key(pub: Path) -> bytes:
    """The key in a ``.pub`` file as ``lineside keys generate`` writes it."""
    lines = [ln for ln in pub.read_text().splitlines() if ln and not ln.startswith("#")]
    return bytes.fromhex(lines[-1])


def error_lines(result: Result) -> list[str]:
    return [ln for ln in result.output.splitlines() if ln.strip()]


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def retained_manifests(url: str, **auth: Any) -> dict[str, bytes]:
    """Every retained manifest on the broker (complete: bounded by a probe message)."""
    found: dict[str, bytes] = {}
    done = threading.Event()
    nonce = uuid.uuid4().hex
    probe = f"probe/{nonce}"
    link = MqttLink(LinkOptions(url=url, client_id=f"reader-{nonce[:8]}", **auth))

    def on_manifest(msg: Message) -> None:
        if msg.retain and msg.payload:
            found[msg.topic] = msg.payload

    link.subscribe(f"{ROOT}/manifests/#", on_manifest)
    link.subscribe(probe, lambda _m: done.set())
    link.start(wait=10.0)
    try:
        link.publish(probe, nonce.encode(), qos=1)
        assert done.wait(10.0), "probe never came back"
    finally:
        link.stop(timeout=2.0)
    return found


def the_manifest(url: str, model: str, **auth: Any) -> bytes:
    return the_manifests(url, **auth)[model]


def the_manifests(url: str, **auth: Any) -> dict[str, bytes]:
    """Model -> the retained manifest of GROUP."""
    prefix = f"{ROOT}/manifests/{GROUP}/"
    found = retained_manifests(url, **auth)
    return {t[len(prefix):]: wire for t, wire in found.items() if t.startswith(prefix)}


def signers(wire: bytes) -> list[str]:
    return [s["keyid"] for s in json.loads(wire)["signatures"]]


def signed(wire: bytes) -> dict[str, Any]:
    return dict(json.loads(wire)["signed"])


def set_signing(config: Path, key: str, extra: list[str]) -> None:
    """Edit ``[signing]`` of sync.toml as an operator would."""
    text = config.read_text()
    block = f"[signing]\nkey = {json.dumps(key)}\nextra_keys = {json.dumps(extra)}\n"
    text, n = re.subn(r"\[signing\]\n.*?(?=\n\[topics\])", block, text, flags=re.S)
    assert n == 1
    config.write_text(text)


class Gateway:
    """A real agent on the broker, configured like a device: ``[trusted_keys]`` names
    ``.pub`` files copied next to its config. ``restart(keys)`` rewrites the config and
    restarts the agent on the same state directory (what config management does)."""

    def __init__(self, root: Path, device: str, broker_url: str, models: tuple[str, ...]) -> None:
        self.root = root
        self.device = device
        self.broker_url = broker_url
        self.models = models
        self.agent: Agent | None = None

    def write_config(self, keys: dict[str, Path]) -> Path:
        keydir = self.root / "keys"
        shutil.rmtree(keydir, ignore_errors=True)
        keydir.mkdir(parents=True)
        trusted = []
        for kid, pub in keys.items():
            shutil.copy(pub, keydir / pub.name)
            trusted.append(f'{kid} = "keys/{pub.name}"')
        models = "".join(
            f'\n[[models]]\nname = "{m}"\ninput_topics = ["{SENSORS}"]\n'
            '[models.fields]\nvibration = "vibration"\ntemp = "temp"\ncurrent = "current"\n'
            for m in self.models
        )
        path = self.root / "agent.toml"
        path.write_text(
            f"""[device]
id = "{self.device}"
class = "sim-class"
groups = ["{GROUP}"]
state_dir = "state"
topic_root = "{ROOT}"

[runtime]
variants = ["onnx-int8", "onnx-fp32"]

[broker]
url = "{self.broker_url}"
keepalive_s = 5

[trusted_keys]
{chr(10).join(trusted)}

[health]
window_s = 1.0
max_error_rate = 0.5
latency_budget_ms = 1000.0

[telemetry]
interval_s = 0.5
{models}"""
        )
        return path

    def start(self, keys: dict[str, Path]) -> None:
        assert self.agent is None
        self.agent = Agent(load_config(self.write_config(keys)))
        self.agent.start()

    def restart(self, keys: dict[str, Path]) -> None:
        self.stop()
        self.start(keys)

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop(timeout=3.0)
            self.agent = None

    def _agent(self) -> Agent:
        assert self.agent is not None
        return self.agent

    def serving(self, model: str) -> tuple[int, str] | None:
        """(version, sha256) of the model the engine answers with, or None."""
        loaded = self._agent().engine.current(model)
        return None if loaded is None else (loaded.manifest.version, loaded.sha256)

    def serves(self, model: str, version: int) -> bool:
        now = self.serving(model)
        return now is not None and now[0] == version

    def sequence(self, model: str) -> int | None:
        return self._agent().store.accepted_sequence(GROUP, model)

    def at_sequence(self, model: str, sequence: int) -> bool:
        return self.sequence(model) == sequence

    def transitions(self) -> list[State]:
        return [to for _from, to in self._agent().updater.history]


# ---- 1. key rotation, as docs/operations.md section 9 says -------------------------------

SECOND_MODEL = "sync-rotation-second"


def test_key_rotation_follows_the_documented_procedure(
    tmp_path: Path, broker: MosquittoBroker, registry: Registry
) -> None:
    # Model A gets a new version during the overlap; model B is deployed before the
    # rotation and left alone, so at the switch one retained manifest carries both
    # signatures and the other only the old one.
    a = log_versions(registry, SHARED_MODEL)
    b = log_versions(registry, SECOND_MODEL, count=1)
    registry.set_alias(a, "production", 1)
    registry.set_alias(b, "production", 1)
    keydir = tmp_path / "sync" / "keys"
    old_kid = generate(keydir, "release")  # the key in service before the rotation
    config, world_keys = write_world(
        tmp_path / "sync",
        broker_url=broker.url,
        tracking_uri=registry.tracking_uri,
        model=a,
        cache_dir=shared_cache_dir(),
        extra=f'[[models]]\nname = "{b}"\nalias = "production"\n',
    )
    old_pub = keydir / "release.pub"
    assert world_keys == {old_kid: public_key(old_pub)}
    models = (a, b)
    gw_a = Gateway(tmp_path / "gw-a", "gw-a", broker.url, models)  # follows every step
    gw_lag = Gateway(tmp_path / "gw-lag", "gw-lag", broker.url, models)  # never gets step 3
    gw_new = Gateway(tmp_path / "gw-new", "gw-new", broker.url, models)  # new key only
    gateways = (gw_a, gw_lag, gw_new)
    events = Collector(broker.url, f"{ROOT}/devices/+/events", "rotation-events")
    predictions = Collector(broker.url, f"{ROOT}/devices/gw-lag/predictions", "rotation-preds")
    sensor = MqttLink(LinkOptions(url=broker.url, client_id="rotation-sensor"))
    sensor.start(wait=10.0)

    def unknown_key(device: str) -> list[dict[str, Any]]:
        return [
            e for e in events.json() if e.get("device") == device and e["code"] == "unknown_key"
        ]

    try:
        result = sync_once(config)
        assert result.exit_code == 0 and "2 manifest(s) published" in result.stdout, result.output
        gw_a.start({old_kid: old_pub})
        gw_lag.start({old_kid: old_pub})
        for gw in (gw_a, gw_lag):
            for m in models:
                assert wait_until(partial(gw.serves, m, 1)), (gw.device, m)
        before = the_manifests(broker.url)
        b_v1 = before[b]

        # Step 1: generate the new key; the printed id is the id of the .pub file's key.
        new_kid = generate(keydir, "release-2027")
        new_pub = keydir / "release-2027.pub"
        assert new_kid != old_kid and new_kid == key_id(public_key(new_pub))
        assert stat.S_IMODE((keydir / "release-2027.pem").stat().st_mode) == 0o600

        # Step 2: sign with both keys. What is retained is not re-signed ...
        set_signing(config, "keys/release.pem", ["keys/release-2027.pem"])
        result = sync_once(config)
        assert result.exit_code == 0 and "0 manifest(s) published" in result.stdout, result.output
        assert the_manifests(broker.url) == before
        assert signers(b_v1) == [old_kid]
        # ... every manifest published from now on carries both signatures.
        registry.set_alias(a, "production", 2)
        result = sync_once(config)
        assert result.exit_code == 0 and "1 manifest(s) published" in result.stdout, result.output
        overlap = the_manifests(broker.url)[a]
        assert sorted(signers(overlap)) == sorted([old_kid, new_kid])
        # Agents that trust only the old key take it; so does one that trusts only the new
        # key (which refuses B's manifest, signed before the overlap by the old key alone).
        gw_new.start({new_kid: new_pub})
        for gw in gateways:
            assert wait_until(partial(gw.serves, a, 2)), gw.device
        a_v2 = (2, signed(overlap)["files"][0]["sha256"])
        assert {gw.serving(a) for gw in gateways} == {a_v2}
        assert wait_until(lambda: len(unknown_key("gw-new")) == 1), events.json()
        assert unknown_key("gw-new")[0]["model"] == b and gw_new.serving(b) is None

        # Step 3: the new public key into the device configs, the old entry kept; restart.
        gw_a.restart({old_kid: old_pub, new_kid: new_pub})
        assert gw_a.serving(a) == a_v2  # from disk, before any network
        b_seq = signed(b_v1)["sequence"]
        assert wait_until(lambda: gw_a.sequence(a) == signed(overlap)["sequence"])
        assert gw_a.sequence(b) == b_seq

        # Step 4: switch. A manifest signed by the old key alone is re-signed with the new
        # key and a higher sequence (agents that trust it download nothing); one from the
        # overlap already verifies with the new key and stays as it is.
        gw_a._agent().updater.history.clear()
        set_signing(config, "keys/release-2027.pem", [])
        result = sync_once(config)
        assert result.exit_code == 0 and "1 manifest(s) published" in result.stdout, result.output
        switched = the_manifests(broker.url)
        assert switched[a] == overlap
        assert signers(switched[b]) == [new_kid]
        seq = signed(switched[b])["sequence"]
        b_v1_sha = signed(b_v1)["files"][0]["sha256"]
        assert seq > b_seq and signed(switched[b])["files"][0]["sha256"] == b_v1_sha
        assert wait_until(partial(gw_a.at_sequence, b, seq))
        assert gw_a.serving(b) == (1, b_v1_sha) and gw_a.serving(a) == a_v2
        assert wait_until(lambda: State.ACTIVATING in gw_a.transitions())
        assert State.DOWNLOADING not in gw_a.transitions()
        assert wait_until(partial(gw_new.serves, b, 1))  # it now has a manifest it trusts
        # The device that missed step 3 refuses the re-signed manifest and keeps serving.
        assert wait_until(lambda: len(unknown_key("gw-lag")) == 1), events.json()
        refusal = unknown_key("gw-lag")[0]
        assert refusal["model"] == b and new_kid in refusal["message"]
        assert gw_lag.serving(b) == (1, b_v1_sha) and gw_lag.sequence(b) == b_seq
        # Nothing left to re-sign: the next pass publishes nothing.
        result = sync_once(config)
        assert result.exit_code == 0 and "0 manifest(s) published" in result.stdout, result.output

        # Step 5: the old key out of the device configs, the old private key destroyed.
        gw_a.restart({new_kid: new_pub})
        assert gw_a.serving(a) == a_v2 and gw_a.serving(b) == (1, b_v1_sha)
        (keydir / "release.pem").unlink()
        registry.set_alias(a, "production", 1)  # a new deployment (a rollback) after that
        result = sync_once(config)
        assert result.exit_code == 0 and "1 manifest(s) published" in result.stdout, result.output
        after = the_manifests(broker.url)[a]
        assert signers(after) == [new_kid] and signed(after)["version"] == 1
        for gw in (gw_a, gw_new):
            assert wait_until(partial(gw.serves, a, 1)), gw.device
        assert wait_until(lambda: len(unknown_key("gw-lag")) == 2), events.json()
        assert unknown_key("gw-lag")[1]["model"] == a
        assert gw_lag.serving(a) == a_v2
        assert gw_lag.sequence(a) == signed(overlap)["sequence"]
        # ... and it still answers sensor messages with the models it had.
        body = {"vibration": 0.3, "temp": -0.2, "current": 1.0, "id": "after-rotation"}
        assert sensor.publish("plant/rotation/a/sensors", json.dumps(body), 1).wait(5)
        assert predictions.wait_for(
            lambda c: any(
                (p.get("model"), p.get("version")) == (a, 2)
                for m in c.json()
                for p in iter_predictions(m)
            ),
            timeout=30,
        ), predictions.json()
        codes = {e["code"] for e in events.json()}
        assert not codes & {"bad_signature", "malformed_manifest"}, codes
    finally:
        for gw in gateways:
            gw.stop()
        sensor.stop(timeout=2.0)
        events.stop()
        predictions.stop()


UNDEPLOY_MODEL = "sync-rotation-undeploy"


def test_key_switch_re_signs_a_retained_undeploy_for_devices_that_missed_it(
    tmp_path: Path, broker: MosquittoBroker, registry: Registry
) -> None:
    """An undeploy signed by the old key alone is re-signed at the switch (step 4), so a
    device that was offline for it and now trusts only the new key still withdraws the
    model; bytes on the broker that are not the ones the service recorded never are."""
    name = log_versions(registry, UNDEPLOY_MODEL, count=1)
    registry.set_alias(name, "production", 1)
    keydir = tmp_path / "sync" / "keys"
    old_kid = generate(keydir, "release")
    config, _keys = write_world(
        tmp_path / "sync",
        broker_url=broker.url,
        tracking_uri=registry.tracking_uri,
        model=name,
        cache_dir=shared_cache_dir(),
    )
    old_pub = keydir / "release.pub"
    gw = Gateway(tmp_path / "gw", "gw-undeploy", broker.url, (name,))
    events = Collector(broker.url, f"{ROOT}/devices/gw-undeploy/events", "undeploy-events")
    link = MqttLink(LinkOptions(url=broker.url, client_id="undeploy-forger"))
    link.start(wait=10.0)
    topic = f"{ROOT}/manifests/{GROUP}/{name}"
    try:
        result = sync_once(config)
        assert result.exit_code == 0 and "1 manifest(s) published" in result.stdout, result.output
        gw.start({old_kid: old_pub})
        assert wait_until(partial(gw.serves, name, 1))
        deployed_seq = signed(the_manifest(broker.url, name))["sequence"]
        gw.stop()  # offline: it misses the undeploy

        registry.client().delete_registered_model_alias(name, "production")
        result = sync_once(config)
        assert result.exit_code == 0 and "1 manifest(s) published" in result.stdout, result.output
        undeploy = the_manifest(broker.url, name)
        assert signers(undeploy) == [old_kid] and signed(undeploy)["undeployed"] is True
        undeploy_seq = signed(undeploy)["sequence"]
        assert undeploy_seq > deployed_seq

        # Rotation steps 1-2: the overlap leaves the retained undeploy as it is.
        new_kid = generate(keydir, "release-2027")
        new_pub = keydir / "release-2027.pub"
        set_signing(config, "keys/release.pem", ["keys/release-2027.pem"])
        result = sync_once(config)
        assert result.exit_code == 0 and "0 manifest(s) published" in result.stdout, result.output
        assert the_manifest(broker.url, name) == undeploy

        # Step 4, switch. Retained bytes other than the recorded ones, even validly signed
        # by the old key, are not the service's to re-sign: they stay, nothing is published.
        set_signing(config, "keys/release-2027.pem", [])
        forged_doc = {**signed(undeploy), "on_undeploy": "stop", "sequence": undeploy_seq + 5}
        forged = signing.sign_manifest(forged_doc, signing.load_private_key(keydir / "release.pem"))
        assert link.publish(topic, forged, qos=1, retain=True).wait(5)
        result = sync_once(config)
        assert result.exit_code == 0 and "0 manifest(s) published" in result.stdout, result.output
        assert the_manifest(broker.url, name) == forged
        # The recorded undeploy back on the broker: re-signed with the new key, higher sequence.
        assert link.publish(topic, undeploy, qos=1, retain=True).wait(5)
        result = sync_once(config)
        assert result.exit_code == 0 and "1 manifest(s) published" in result.stdout, result.output
        resigned = the_manifest(broker.url, name)
        assert signers(resigned) == [new_kid]
        assert signed(resigned)["sequence"] > undeploy_seq
        assert {k: v for k, v in signed(resigned).items() if k not in VOLATILE} == {
            k: v for k, v in signed(undeploy).items() if k not in VOLATILE
        }
        result = sync_once(config)  # nothing left to re-sign
        assert result.exit_code == 0 and "0 manifest(s) published" in result.stdout, result.output

        # Step 5: the old key retired on the device, which comes back and withdraws the model.
        (keydir / "release.pem").unlink()
        gw.start({new_kid: new_pub})
        seq = signed(resigned)["sequence"]
        assert wait_until(partial(gw.at_sequence, name, seq))
        assert wait_until(
            lambda: gw._agent().updater.snapshot.get(name, {}).get("desired") is False
        )
        assert wait_until(
            lambda: any(e["code"] == "undeployed" and e.get("model") == name
                        for e in events.json())
        ), events.json()
        assert gw.serves(name, 1)  # on_undeploy "keep": withdrawn, still answering
        ours = [e for e in events.json() if e.get("model") == name]
        (undeployed,) = [e for e in ours if e["code"] == "undeployed"]
        assert undeployed["sequence"] == seq
        # The copies signed by the old key alone that the broker queued for the device's
        # session while it was offline are refused; nothing else is.
        later = [e for e in ours if e["code"] not in {"accepted", "installed", "activated"}]
        assert {e["code"] for e in later} <= {"unknown_key", "undeployed"}, later
        assert all(
            f"signed by: {old_kid}" in e["message"] for e in later if e["code"] == "unknown_key"
        ), later
    finally:
        gw.stop()
        link.stop(timeout=2.0)
        events.stop()


# ---- 2. the webhook endpoint over real HTTP ------------------------------------------------


def post(
    port: int, body: bytes, headers: dict[str, str], *, send_body: bool = True
) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("POST", "/")
        for key, value in headers.items():
            conn.putheader(key, value)
        conn.endheaders(body if send_body else None)
        return conn.getresponse().status
    finally:
        conn.close()


def test_webhook_refuses_unverified_deliveries_and_hints_on_a_good_one(
    tmp_path: Path, registry: Registry
) -> None:
    secret_file = tmp_path / "sync" / "webhook-secret"
    secret_file.parent.mkdir(parents=True)
    secret_file.write_text("wh-s3cret\n")
    secret_file.chmod(0o600)  # a secret readable by others is refused
    config, _ = write_world(
        tmp_path / "sync",
        broker_url="mqtt://127.0.0.1:1",  # never connected: the test only needs the wiring
        tracking_uri=registry.tracking_uri,
        model="webhook-model",
        extra='[webhook]\nlisten = "127.0.0.1:0"\nsecret_file = "webhook-secret"\n',
    )
    service = SyncService(load_sync_config(config))
    w = service.config.webhook
    assert w is not None and w.secret == "wh-s3cret"
    # What SyncService.run starts: a verified delivery sets service.wake (a pass now).
    server = WebhookServer(w.host, w.port, w.secret, service.wake.set, w.max_skew_s)
    server.start()
    body = b'{"entity": "model_version_alias", "action": "created"}'

    def headers(
        *, secret: str = "wh-s3cret", ts: int | str | None = None, payload: bytes = body
    ) -> dict[str, str]:
        stamp = str(int(time.time()) if ts is None else ts)
        return {
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            "X-MLflow-Delivery-Id": "d-42",
            "X-MLflow-Timestamp": stamp,
            "X-MLflow-Signature": sign_delivery(secret, "d-42", stamp, payload),
        }

    now = int(time.time())
    good = headers()
    refused: dict[str, tuple[int, dict[str, str]]] = {
        "wrong secret": (401, headers(secret="not-the-secret")),
        "signature over another body": (401, headers(payload=body + b" ")),
        "stale timestamp (a replay)": (401, headers(ts=now - 3600)),
        "timestamp from the future": (401, headers(ts=now + 3600)),
        "non-ASCII digit timestamp": (401, {**good, "X-MLflow-Timestamp": "\u00b2"}),
        "no signature": (401, {k: v for k, v in good.items() if k != "X-MLflow-Signature"}),
        "no delivery id": (401, {k: v for k, v in good.items() if k != "X-MLflow-Delivery-Id"}),
        "no timestamp": (401, {k: v for k, v in good.items() if k != "X-MLflow-Timestamp"}),
        "unsigned": (401, {"Content-Length": str(len(body))}),
    }
    # Refused before the body is read (so none is sent: unread data would reset the socket).
    unread: dict[str, tuple[int, dict[str, str]]] = {
        "negative length": (400, {**good, "Content-Length": "-1"}),
        "non-numeric length": (400, {**good, "Content-Length": "12abc"}),
        "no length": (400, {k: v for k, v in good.items() if k != "Content-Length"}),
        "too large": (413, {**good, "Content-Length": str(MAX_BODY + 1)}),
    }
    try:
        for what, (code, hdrs) in refused.items():
            assert post(server.port, body, hdrs) == code, what
            assert not service.wake.is_set() and server.hints == 0, what
        for what, (code, hdrs) in unread.items():
            assert post(server.port, body, hdrs, send_body=False) == code, what
            assert not service.wake.is_set() and server.hints == 0, what

        assert post(server.port, body, good) == 200
        assert service.wake.is_set() and server.hints == 1  # set before the 200 was sent
        # The good delivery signed like MLflow does (the other test checks MLflow's code).
        digest = hmac.new(b"wh-s3cret", f"d-42.{good['X-MLflow-Timestamp']}.".encode() + body,
                          hashlib.sha256).digest()
        assert good["X-MLflow-Signature"] == "v1," + base64.b64encode(digest).decode()
    finally:
        server.stop()


# ---- 3. sync against a broker with TLS and password / certificate auth ----------------------

SYNC_USER = "lineside-sync"
SYNC_PASSWORD = "sync-pw-0f3a"
READER = {"username": "reader", "password": "reader-pw"}


def broker_auth(config: Path, auth: str, tls: str) -> None:
    """Put credentials into ``[broker]`` and a ``[broker.tls]`` table into sync.toml."""
    text = config.read_text()
    marker = "publish_timeout_s = 10\n"
    assert marker in text and "\n[signing]" in text
    text = text.replace(marker, marker + "connect_timeout_s = 5\n" + auth)
    text = text.replace("\n[signing]", f"\n[broker.tls]\n{tls}\n[signing]", 1)
    config.write_text(text)


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[MosquittoBroker]:
    passwords = {SYNC_USER: SYNC_PASSWORD, READER["username"]: READER["password"]}
    with running_broker(tmp_path / "tls-broker", tls=True, passwords=passwords) as b:
        yield b


def test_sync_over_tls_with_password_file_and_env_and_actionable_refusals(
    tmp_path: Path, tls_broker: MosquittoBroker, registry: Registry
) -> None:
    name = log_versions(registry, SHARED_MODEL)
    registry.set_alias(name, "production", 1)
    assert tls_broker.tls_files is not None and tls_broker.url.startswith("mqtts://")
    ca = tls_broker.tls_files.ca_cert
    config, keys = write_world(
        tmp_path / "sync",
        broker_url=tls_broker.url,
        tracking_uri=registry.tracking_uri,
        model=name,
        cache_dir=shared_cache_dir(),
    )
    secret = tmp_path / "sync" / "broker-password"
    secret.write_text(SYNC_PASSWORD + "\n")
    secret.chmod(0o600)
    broker_auth(
        config,
        f'username = "{SYNC_USER}"\npassword_file = "broker-password"\n',
        f'ca = "{ca}"\n',
    )
    reader = {**READER, "ca": ca}
    pristine = config.read_text()

    result = sync_once(config)
    assert result.exit_code == 0 and "1 manifest(s) published" in result.stdout, result.output
    wire = the_manifest(tls_broker.url, name, **reader)
    trusted = {kid: PublicKey(raw) for kid, raw in keys.items()}
    assert verify_envelope(decode_envelope(wire), trusted) in keys
    assert signed(wire)["version"] == 1

    # The environment-variable variant.
    env_config = pristine.replace(
        'password_file = "broker-password"', 'password_env = "LINESIDE_TEST_SYNC_PW"'
    )
    config.write_text(env_config)
    registry.set_alias(name, "production", 2)
    result = sync_once(config, env={"LINESIDE_TEST_SYNC_PW": SYNC_PASSWORD})
    assert result.exit_code == 0 and "1 manifest(s) published" in result.stdout, result.output
    assert signed(the_manifest(tls_broker.url, name, **reader))["version"] == 2

    # A wrong password: one line that says the broker refused us and why; nothing sent.
    registry.set_alias(name, "production", 1)
    result = sync_once(config, env={"LINESIDE_TEST_SYNC_PW": "not-the-password"})
    assert result.exit_code == 1, result.output
    (line,) = error_lines(result)
    assert "Traceback" not in result.output and tls_broker.url in line
    assert "refused the connection" in line and "not authori" in line.lower(), line
    assert signed(the_manifest(tls_broker.url, name, **reader))["version"] == 2

    # A CA that did not sign the broker's certificate: the TLS failure, in one line.
    other_ca = make_tls_files(tmp_path / "other-ca").ca_cert
    config.write_text(env_config.replace(f'ca = "{ca}"', f'ca = "{other_ca}"'))
    result = sync_once(config, env={"LINESIDE_TEST_SYNC_PW": SYNC_PASSWORD})
    assert result.exit_code == 1, result.output
    (line,) = error_lines(result)
    assert tls_broker.url in line and "certificate verify failed" in line, line

    # No credentials at all against a broker that requires them.
    config.write_text(
        re.sub(r'username = .*\npassword_file = .*\n', "", pristine)
    )
    result = sync_once(config)
    assert result.exit_code == 1, result.output
    (line,) = error_lines(result)
    assert "refused the connection" in line, line
    assert signed(the_manifest(tls_broker.url, name, **reader))["version"] == 2


def test_sync_with_a_client_certificate_publishes_and_without_one_is_refused(
    tmp_path: Path, registry: Registry
) -> None:
    name = log_versions(registry, SHARED_MODEL)
    registry.set_alias(name, "production", 1)
    with running_broker(tmp_path / "mtls-broker", tls=True, require_certificate=True) as b:
        assert b.tls_files is not None
        cert, key = b.tls_files.client_pair(SYNC_USER)
        config, _ = write_world(
            tmp_path / "sync",
            broker_url=b.url,
            tracking_uri=registry.tracking_uri,
            model=name,
            cache_dir=shared_cache_dir(),
        )
        pristine = config.read_text()
        broker_auth(config, "", f'ca = "{b.tls_files.ca_cert}"\n')
        result = sync_once(config)
        assert result.exit_code == 1, result.output  # TLS, but no client certificate
        (line,) = error_lines(result)
        assert b.url in line, line

        config.write_text(pristine)
        broker_auth(
            config, "", f'ca = "{b.tls_files.ca_cert}"\ncert = "{cert}"\nkey = "{key}"\n'
        )
        result = sync_once(config)
        assert result.exit_code == 0 and "1 manifest(s) published" in result.stdout, result.output
        reader_cert, reader_key = b.tls_files.client_pair("reader")
        wire = the_manifest(
            b.url, name, ca=b.tls_files.ca_cert, cert=reader_cert, key=reader_key
        )
        assert signed(wire)["version"] == 1


# ---- 4. keys: what test_sync_config.py does not cover ---------------------------------------


def test_keys_generate_never_replaces_a_private_key_and_ignores_a_loose_umask(
    tmp_path: Path,
) -> None:
    out = tmp_path / "keys"
    old_umask = os.umask(0)  # the mode must not depend on the caller's umask
    try:
        kid = generate(out, "rel")
    finally:
        os.umask(old_umask)
    private, public = out / "rel.pem", out / "rel.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert kid == key_id(public_key(public))
    before = private.read_bytes()

    public.unlink()  # the .pub lost: the private key must still not be replaced
    result = run_cli("keys", "generate", "--out", str(out), "--name", "rel")
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert "refusing to overwrite" in line and str(private) in line, line
    assert private.read_bytes() == before and not public.exists()


def test_sync_refuses_a_loose_or_missing_extra_rotation_key_in_one_line(
    tmp_path: Path, registry: Registry
) -> None:
    config, _ = write_world(
        tmp_path / "sync",
        broker_url="mqtt://127.0.0.1:1",  # the keys are loaded before any connection
        tracking_uri=registry.tracking_uri,
        model="extra-key-model",
    )
    keydir = tmp_path / "sync" / "keys"
    generate(keydir, "release-2027")
    extra = keydir / "release-2027.pem"
    extra.chmod(0o644)
    set_signing(config, "keys/release.pem", ["keys/release-2027.pem"])
    result = sync_once(config)
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert extra.name in line and "chmod 600" in line and "0644" in line, line

    extra.unlink()
    result = sync_once(config)
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert "signing key not found" in line and extra.name in line, line
