"""The demo's MQTT broker: Mosquitto from PATH when present, else amqtt in-process.

Either listens on a free loopback port only. Mosquitto gets ``set_tcp_nodelay true``
(Nagle's algorithm costs ~88 ms per QoS 1 round trip) and persistence in the work dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lineside.demo.errors import BrokerStartError

# Told about a broker process as soon as it exists, so that a failure or a signal
# between its start and the broker being up still stops it.
OnStart = Callable[[str, "subprocess.Popen[bytes]"], None]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class DemoBroker:
    kind: str  # "mosquitto" or "amqtt"
    port: int
    _proc: subprocess.Popen[bytes] | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _broker: Any = None
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
            self._proc = None
        if self._loop is not None and self._broker is not None:
            future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
            with contextlib.suppress(Exception):
                future.result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._loop = None


def start_broker(
    workdir: Path, *, prefer: str = "auto", on_start: OnStart | None = None
) -> DemoBroker:
    """Start a broker; ``prefer`` is auto, mosquitto or amqtt. ``BrokerStartError`` if
    none can start (nothing is left running then)."""
    port = free_port()
    if prefer in ("auto", "mosquitto") and shutil.which("mosquitto"):
        return _start_mosquitto(workdir, port, on_start)
    if prefer == "mosquitto":
        raise BrokerStartError("mosquitto is not on PATH (apt-get install mosquitto)")
    return _start_amqtt(port)


def _start_mosquitto(workdir: Path, port: int, on_start: OnStart | None) -> DemoBroker:
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        "\n".join(
            [
                f"user {getpass.getuser()}",
                f"listener {port} 127.0.0.1",
                "allow_anonymous true",
                "set_tcp_nodelay true",
                "persistence true",
                f"persistence_location {workdir}/",
                "autosave_on_changes true",
                "max_queued_messages 100000",
                f"log_dest file {workdir / 'mosquitto.log'}",
            ]
        )
        + "\n"
    )
    proc = subprocess.Popen(
        ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    broker = DemoBroker("mosquitto", port, _proc=proc)
    if on_start is not None:
        on_start("mosquitto", proc)
    try:
        _wait_port(port, lambda: proc.poll() is None)
    except BaseException:
        broker.stop()
        raise
    return broker


def _start_amqtt(port: int) -> DemoBroker:
    try:
        from amqtt.broker import Broker
    except ImportError as exc:
        raise BrokerStartError(
            "no MQTT broker: install mosquitto (apt-get install mosquitto) or "
            "pip install 'lineside[demo]' for the embedded amqtt broker"
        ) from exc
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }
    loop = asyncio.new_event_loop()
    broker = Broker(config, loop=loop)
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(broker.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
    thread.start()
    if not started.wait(15):
        raise BrokerStartError("the embedded amqtt broker did not start")
    demo = DemoBroker("amqtt", port, _loop=loop, _broker=broker, _thread=thread)
    try:
        _wait_port(port, thread.is_alive)
    except BaseException:
        demo.stop()
        raise
    return demo


def _wait_port(port: int, alive: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise BrokerStartError(f"the broker exited at start (port {port})")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise BrokerStartError(f"the broker did not open port {port} within {timeout:.0f}s")
