"""The shipped Mosquitto configs, run for real: device_configs/mosquitto/*.

The files are used as shipped; only install paths, ports and the bridge password are
substituted (each substitution must match, so a renamed path fails loudly here).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge_agent.errors import BrokerError
from edge_agent.mqtt import LinkOptions, Message, MqttLink
from edge_agent.protocol.chunks import MAX_CHUNK_SIZE
from edge_agent.protocol.manifest import Limits
from edge_agent.protocol.topics import MAX_ID_LENGTH
from tests.support.broker import TlsFiles, free_port, make_tls_files

CONF_DIR = Path(__file__).resolve().parents[1] / "device_configs" / "mosquitto"
DEVICE_A = "press-line3-pi4"  # the device gateway-bridge.conf is written for
DEVICE_B = "packaging-line1-pi5"
USERS = {"lineside-sync": "sync-pw", DEVICE_A: "a-pw", DEVICE_B: "b-pw"}


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def render(name: str, workdir: Path, substitutions: dict[str, str]) -> Path:
    text = (CONF_DIR / name).read_text()
    for old, new in substitutions.items():
        assert old in text, f"{name} no longer contains {old!r}"
        text = text.replace(old, new)
    # Run as ourselves: as root, Mosquitto would switch to "mosquitto" and lose our files.
    text += f"\nuser {getpass.getuser()}\n"
    path = workdir / name
    path.write_text(text)
    return path


def password_file(path: Path, users: dict[str, str]) -> Path:
    path.write_text("")
    for user, password in users.items():
        subprocess.run(["mosquitto_passwd", "-b", str(path), user, password], check=True,
                       capture_output=True)
    path.chmod(0o600)
    return path


@dataclass
class ConfiguredBroker:
    """A Mosquitto started from a rendered config file, stopped by its pid."""

    config: Path
    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None)

    def start(self) -> None:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited: {err}{self.read_log()}")
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.2
            ):
                return
            time.sleep(0.02)
        raise RuntimeError("mosquitto did not open its port")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()  # SIGTERM: Mosquitto saves its persistence file
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()

    def read_log(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@dataclass
class Plant:
    broker: ConfiguredBroker
    tls: TlsFiles
    certs: dict[str, tuple[Path, Path]]

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.broker.port}"


@pytest.fixture
def plant(tmp_path: Path) -> Iterator[Plant]:
    workdir = tmp_path / "plant"
    (workdir / "data").mkdir(parents=True)
    tls = make_tls_files(workdir / "tls")
    acl = workdir / "acl"
    acl.write_text((CONF_DIR / "acl").read_text())
    acl.chmod(0o600)
    port = free_port()
    log = workdir / "mosquitto.log"
    config = render("plant-broker.conf", workdir, {
        "listener 8883": f"listener {port} 127.0.0.1",
        "/etc/mosquitto/certs/plant-ca.crt": str(tls.ca_cert),
        "/etc/mosquitto/certs/plant-broker.crt": str(tls.server_cert),
        "/etc/mosquitto/certs/plant-broker.key": str(tls.server_key),
        "/etc/mosquitto/passwd": str(password_file(workdir / "passwd", USERS)),
        "/etc/mosquitto/acl": str(acl),
        "/var/lib/mosquitto/": f"{workdir / 'data'}/",
        "log_dest syslog": f"log_dest file {log}",
    })
    broker = ConfiguredBroker(config, port, log)
    broker.start()
    certs = {name: tls.client_pair(name) for name in USERS}
    try:
        yield Plant(broker, tls, certs)
    finally:
        broker.stop()


@pytest.fixture
def connect() -> Iterator[Callable[..., MqttLink]]:
    made: list[MqttLink] = []

    def make(url: str, client_id: str, *, subscribe: tuple[str, ...] = (),
             wait: float = 10, **options: object) -> tuple[MqttLink, list[Message]]:
        link = MqttLink(LinkOptions(url=url, client_id=client_id, backoff_initial=0.2,
                                    backoff_max=1.0, **options))  # type: ignore[arg-type]
        made.append(link)
        got: list[Message] = []
        for topic_filter in subscribe:
            link.subscribe(topic_filter, got.append)
        link.start(wait=wait)
        return link, got

    yield make  # type: ignore[misc]
    for link in made:
        link.stop(timeout=2)


def plant_client(plant: Plant, user: str, **kw: object) -> dict[str, object]:
    cert, key = plant.certs[user]
    return {"url": plant.url, "client_id": user, "username": user, "password": USERS[user],
            "ca": plant.tls.ca_cert, "cert": cert, "key": key, **kw}


def test_plant_broker_refuses_anonymous_plaintext_and_strangers(plant: Plant, connect) -> None:  # type: ignore[no-untyped-def]
    cert, key = plant.certs[DEVICE_A]
    with pytest.raises(BrokerError):  # TLS + certificate, but no username: anonymous
        connect(plant.url, "anon", ca=plant.tls.ca_cert, cert=cert, key=key, wait=3)
    with pytest.raises(BrokerError):  # wrong password
        connect(plant.url, DEVICE_A, username=DEVICE_A, password="nope",
                ca=plant.tls.ca_cert, cert=cert, key=key, wait=3)
    with pytest.raises(BrokerError):  # plaintext MQTT to the only (TLS) listener
        connect(f"mqtt://127.0.0.1:{plant.broker.port}", DEVICE_A, username=DEVICE_A,
                password=USERS[DEVICE_A], wait=2)
    with pytest.raises(BrokerError):  # right password, no client certificate
        connect(plant.url, DEVICE_A, username=DEVICE_A, password=USERS[DEVICE_A],
                ca=plant.tls.ca_cert, wait=2)
    link, _ = connect(**plant_client(plant, DEVICE_A))
    assert link.publish(f"lineside/devices/{DEVICE_A}/state", b"{}").wait(5)


def test_devices_write_only_their_own_topics_and_read_no_one_elses(plant: Plant, connect) -> None:  # type: ignore[no-untyped-def]
    sync, sync_got = connect(**plant_client(
        plant, "lineside-sync", subscribe=("lineside/devices/#", "lineside/manifests/#")))
    dev_a, a_got = connect(**plant_client(plant, DEVICE_A, subscribe=("lineside/manifests/#",)))
    dev_b, b_got = connect(**plant_client(plant, DEVICE_B, subscribe=(
        f"lineside/devices/{DEVICE_B}/#", f"lineside/devices/{DEVICE_A}/#",
        "lineside/devices/+/state", "lineside/#")))
    own_b = f"lineside/devices/{DEVICE_B}/state"
    assert dev_b.publish(own_b, b"b-1").wait(5)
    assert wait_until(lambda: any(m.payload == b"b-1" for m in b_got), 5)  # B's subs are live

    # A tries to forge a manifest and a chunk, then writes its own state.
    assert dev_a.publish("lineside/manifests/press-anomaly", b"forged", retain=True).wait(5)
    assert dev_a.publish("lineside/chunks/press-anomaly/9/0", b"forged").wait(5)
    assert dev_a.publish(f"lineside/devices/{DEVICE_B}/state", b"impersonated").wait(5)
    assert dev_a.publish(f"lineside/devices/{DEVICE_A}/state", b"a-state").wait(5)
    assert wait_until(lambda: any(m.payload == b"a-state" for m in sync_got), 5)
    assert dev_b.publish(own_b, b"b-2").wait(5)
    assert wait_until(lambda: any(m.payload == b"b-2" for m in b_got), 5)

    # Same connection, same order: had they been accepted, they would have arrived first.
    assert [m.payload for m in sync_got if m.payload in (b"forged", b"impersonated")] == []
    assert [m.topic for m in b_got if DEVICE_A in m.topic or m.payload == b"a-state"] == []
    assert {m.payload for m in b_got} <= {b"b-1", b"b-2"}

    # The sync user may publish manifests; devices read them.
    assert sync.publish("lineside/manifests/press-anomaly", b"signed", retain=True).wait(5)
    assert wait_until(lambda: any(m.payload == b"signed" for m in a_got), 5)
    assert not any(m.payload == b"forged" for m in a_got)


def test_gateway_bridge_forwards_and_queues_while_the_plant_is_down(
    plant: Plant, connect: Callable[..., tuple[MqttLink, list[Message]]], tmp_path: Path
) -> None:
    workdir = tmp_path / "gateway"
    (workdir / "data").mkdir(parents=True)
    cert, key = plant.certs[DEVICE_A]
    port = free_port()
    config = render("gateway-bridge.conf", workdir, {
        "listener 1883 127.0.0.1": f"listener {port} 127.0.0.1",
        "address plant-broker.factory.local:8883": f"address 127.0.0.1:{plant.broker.port}",
        "remote_password CHANGE-AT-PROVISIONING": f"remote_password {USERS[DEVICE_A]}",
        "/etc/mosquitto/certs/plant-ca.crt": str(plant.tls.ca_cert),
        "/etc/mosquitto/certs/device.crt": str(cert),
        "/etc/mosquitto/certs/device.key": str(key),
        "/etc/mosquitto/passwd": str(password_file(workdir / "passwd", {"agent": "agent-pw"})),
        "/var/lib/mosquitto/": f"{workdir / 'data'}/",
        "restart_timeout 2 60": "restart_timeout 1 2",  # keep the test short
    })
    gateway = ConfiguredBroker(config, port, workdir / "mosquitto.log")
    gateway.start()
    try:
        sync, sync_got = connect(**plant_client(plant, "lineside-sync",
                                                subscribe=("lineside/devices/#",)))
        agent, agent_got = connect(f"mqtt://127.0.0.1:{port}", "agent", username="agent",
                                   password="agent-pw", subscribe=("lineside/manifests/#",))
        out = f"lineside/devices/{DEVICE_A}/predictions/press-anomaly"
        # Out: the agent's messages reach the plant once the bridge is up.
        assert wait_until(lambda: agent.publish(out, b"p-0").wait(5) and any(
            m.payload == b"p-0" for m in sync_got), 20)
        # In: a manifest published at the plant reaches the gateway.
        assert sync.publish("lineside/manifests/press-anomaly", b"manifest-1", retain=True).wait(5)
        assert wait_until(lambda: any(m.payload == b"manifest-1" for m in agent_got), 10)
        # Sensor traffic stays local.
        assert agent.publish("plant/line3/press/1/sensors", b"local").wait(5)

        # The plant goes away: the line keeps publishing into the gateway broker.
        plant.broker.stop()
        sent = [f"q-{i}".encode() for i in range(20)]
        for payload in sent:
            assert agent.publish(out, payload).wait(5)
        plant.broker.start()
        assert wait_until(lambda: set(sent) <= {m.payload for m in sync_got}, 30), (
            gateway.read_log())
        assert not any(m.payload == b"local" for m in sync_got)
    finally:
        gateway.stop()


def directive(name: str, conf: str) -> str:
    """The value of a Mosquitto directive as the shipped file sets it (exactly once)."""
    values = [ln.split(None, 1)[1] for ln in (CONF_DIR / conf).read_text().splitlines()
              if ln.split(None, 1)[:1] == [name]]
    assert len(values) == 1, f"{conf} sets {name} {len(values)} times"
    return values[0]


# The longest manifest topic the shipped configs produce (root "lineside", 64-char ids).
LONGEST_MANIFEST_TOPIC = f"lineside/manifests/{'g' * MAX_ID_LENGTH}/{'m' * MAX_ID_LENGTH}"


@pytest.mark.parametrize("conf", ["plant-broker.conf", "gateway-bridge.conf"])
def test_packet_limit_admits_the_largest_manifest_the_protocol_allows(conf: str) -> None:
    limit = int(directive("max_packet_size", conf))
    # PUBLISH: 1 type byte + up to 4 length bytes + 2 + topic + 2 (packet id) + payload.
    largest = 1 + 4 + 2 + len(LONGEST_MANIFEST_TOPIC.encode()) + 2 + Limits().max_manifest_bytes
    assert largest <= limit < 2 * Limits().max_manifest_bytes, (conf, limit, largest)
    assert limit > MAX_CHUNK_SIZE


def test_plant_broker_carries_a_1_mib_manifest_and_drops_larger_packets(
    plant: Plant, connect: Callable[..., tuple[MqttLink, list[Message]]]
) -> None:
    limit = int(directive("max_packet_size", "plant-broker.conf"))
    sync, _ = connect(**plant_client(plant, "lineside-sync"))
    dev, got = connect(**plant_client(plant, DEVICE_A, subscribe=("lineside/manifests/#",
                                                                  "lineside/chunks/#")))
    manifest = b"m" * Limits().max_manifest_bytes
    chunk = b"c" * MAX_CHUNK_SIZE
    chunk_topic = f"lineside/chunks/{'a' * 64}"
    assert sync.publish(chunk_topic, chunk, retain=True).wait(10)
    assert sync.publish(LONGEST_MANIFEST_TOPIC, manifest, retain=True).wait(10)
    assert wait_until(lambda: any(m.payload == manifest for m in got), 20)
    assert [m.topic for m in got] == [chunk_topic, LONGEST_MANIFEST_TOPIC]
    assert dev.connected

    # A payload the size of the limit (so the packet is over it): Mosquitto disconnects
    # the sender and delivers nothing.
    too_big = b"x" * limit
    # (The broker closes the socket once it has read the packet's length, so the write may
    # never complete: the handle is not awaited.)
    sync.publish("lineside/manifests/g/too-big", too_big, qos=0)

    def marker_arrived() -> bool:
        try:
            sync.publish("lineside/manifests/g/after", b"after").wait(2)
        except BrokerError:  # still reconnecting after the broker dropped us
            return False
        return any(m.payload == b"after" for m in got)

    assert wait_until(marker_arrived, 20), plant.broker.read_log()
    assert sync.stats["connects"] >= 2  # the oversized packet cost the sender its connection
    assert not any(m.topic.endswith("/too-big") for m in got)


def test_acl_and_unit_files_are_consistent() -> None:
    acl = (CONF_DIR / "acl").read_text()
    assert "pattern readwrite lineside/devices/%u/#" in acl
    unit = (CONF_DIR.parent / "lineside-agent.service").read_text()
    assert "ExecStart=/opt/lineside/bin/lineside agent run --config /etc/lineside/agent.toml" \
        in unit
    assert "Restart=always" in unit and "EnvironmentFile=" in unit
    lines = [ln for ln in (CONF_DIR / "plant-broker.conf").read_text().splitlines()
             if ln and not ln.startswith("#")]
    assert "allow_anonymous false" in lines and "set_tcp_nodelay true" in lines
    assert [ln for ln in lines if ln.startswith("listener")] == ["listener 8883"]
    assert json.dumps(USERS)  # keep the user table JSON-able for debugging output
    assert os.sep == "/"
