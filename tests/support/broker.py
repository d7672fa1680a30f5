"""A real Mosquitto broker on a free loopback port with a generated config.

Each broker owns a directory (config, persistence, certificates, ACL file); it is
started as a child process, stopped by its pid, and can be restarted with the same
or a changed config, which the fault tests need. Mosquitto's own suite does the same.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path

    def client_pair(self, name: str) -> tuple[Path, Path]:
        """A client certificate signed by the test CA whose CN is ``name``."""
        return _issue_cert(self.ca_cert.parent, name, self.ca_cert, server=False)


@dataclass
class MosquittoBroker:
    """One Mosquitto process. ``port`` is the plain (or TLS, when ``tls``) listener."""

    workdir: Path
    port: int = field(default_factory=free_port)
    persistence: bool = False
    tls: bool = False
    require_certificate: bool = False
    acl: str | None = None  # the text of an ACL file; None means no ACL
    passwords: dict[str, str] | None = None  # username -> password; None means anonymous
    extra_config: str = ""
    # Save persistence after this many changes: 1 makes every change survive a SIGKILL
    # (the tests kill brokers); a long stream wants the shipped configs' 100, since
    # Mosquitto rewrites its whole database at each save.
    autosave_changes: int = 1
    _proc: subprocess.Popen[bytes] | None = None
    tls_files: TlsFiles | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def write_config(self) -> Path:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            # Run as ourselves: started as root, Mosquitto would switch to the
            # "mosquitto" user and could not write to our temp dir.
            f"user {getpass.getuser()}",
            f"listener {self.port} 127.0.0.1",
            # Nagle's algorithm costs ~88 ms per QoS 1 round trip on loopback.
            "set_tcp_nodelay true",
            "max_queued_messages 100000",
            "max_inflight_messages 100",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            "autosave_on_changes true",
            f"autosave_interval {self.autosave_changes}",
            f"log_dest file {self.workdir / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type subscribe",
        ]
        if self.tls:
            if self.tls_files is None:
                self.tls_files = make_tls_files(self.workdir / "tls")
            lines += [
                f"cafile {self.tls_files.ca_cert}",
                f"certfile {self.tls_files.server_cert}",
                f"keyfile {self.tls_files.server_key}",
                f"require_certificate {'true' if self.require_certificate else 'false'}",
            ]
            if self.require_certificate:
                lines.append("use_identity_as_username true")
        if self.passwords is not None:
            pwfile = self.workdir / "passwords"
            pwfile.write_text("")
            for user, password in self.passwords.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(pwfile), user, password],
                    check=True,
                    capture_output=True,
                )
            lines += [f"password_file {pwfile}", "allow_anonymous false"]
        elif not self.require_certificate:
            lines.append("allow_anonymous true")
        else:
            lines.append("allow_anonymous false")
        if self.acl is not None:
            acl_path = self.workdir / "acl"
            acl_path.write_text(self.acl)
            lines.append(f"acl_file {acl_path}")
        if self.extra_config:
            lines.append(self.extra_config)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        # Mosquitto refuses world-readable password/acl files in newer versions.
        for name in ("passwords", "acl"):
            path = self.workdir / name
            if path.exists():
                path.chmod(0o600)
        return conf

    def start(self, timeout: float = 10.0) -> None:
        if self._proc is not None:
            raise RuntimeError("broker already running")
        conf = self.write_config()
        self._proc = subprocess.Popen(
            ["mosquitto", "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                log = self.workdir / "mosquitto.log"
                err += log.read_text() if log.exists() else ""
                self._proc = None
                raise RuntimeError(f"mosquitto exited at start: {err}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("mosquitto did not open its port in time")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop the broker by its pid; SIGTERM lets it save persistence, SIGKILL not."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
        if proc.stderr:
            proc.stderr.close()

    def restart(self, **changes: object) -> None:
        """Stop, apply config changes (e.g. ``persistence=False``), start on the same port."""
        self.stop()
        for key, value in changes.items():
            setattr(self, key, value)
        self.start()

    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text() if path.exists() else ""


@contextlib.contextmanager
def running_broker(workdir: Path, **options: object) -> Iterator[MosquittoBroker]:
    if shutil.which("mosquitto") is None:
        raise RuntimeError("mosquitto is not on PATH; .ci/run installs it from Debian's packages")
    broker = MosquittoBroker(workdir=workdir, **options)  # type: ignore[arg-type]
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _issue_cert(
    directory: Path, name: str, ca_cert_path: Path, *, server: bool
) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lineside test CA")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (directory / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    server_cert, server_key = _issue_cert(directory, "server", ca_path, server=True)
    return TlsFiles(ca_cert=ca_path, server_cert=server_cert, server_key=server_key)
