"""``lineside keys|sync|rollout|fleet``: the command-line face of registry_sync.

Errors print one line on stderr and exit non-zero; ``--debug`` (on each group) shows the
traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from registry_sync.errors import SyncError

__all__ = ["fleet", "keys", "rollout", "sync"]

_DEBUG = "lineside.debug"  # key in click's per-invocation ctx.meta (shared by subcommands)


@contextmanager
def _errors() -> Iterator[None]:
    from registry_sync.signing import SigningError

    try:
        yield
    except (SyncError, SigningError, OSError) as exc:
        ctx = click.get_current_context(silent=True)
        if ctx is not None and ctx.meta.get(_DEBUG):
            raise
        name = type(exc).__name__
        click.echo(f"error: {name}: {exc}", err=True)
        sys.exit(1)


def _set_debug(ctx: click.Context, _param: click.Parameter, value: bool) -> bool:
    if value:
        ctx.meta[_DEBUG] = True
    return value


_debug_option = click.option(
    "--debug",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_set_debug,
    help="Show tracebacks on errors.",
)
_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=Path("sync.toml"),
    show_default=True,
    help="The sync configuration file.",
)


def _load(config_path: Path) -> Any:
    from registry_sync.config import load_sync_config

    return load_sync_config(config_path)


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# ---- keys --------------------------------------------------------------------------------


@click.group()
@_debug_option
def keys() -> None:
    """Generate manifest signing keys."""


@keys.command("generate")
@_debug_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="Directory for <name>.pem (private, 0600) and <name>.pub (hex).",
)
@click.option("--name", default="signing", show_default=True, help="File name stem.")
def keys_generate(out_dir: Path, name: str) -> None:
    """Write a new Ed25519 key pair and print its key id."""
    from registry_sync import signing

    with _errors():
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        private, public = out_dir / f"{name}.pem", out_dir / f"{name}.pub"
        if public.exists():
            raise SyncError(f"{public} exists; refusing to overwrite a key")
        key = signing.generate_private_key()
        signing.save_private_key(key, private)
        mode = stat.S_IMODE(private.stat().st_mode)
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            # e.g. a filesystem that ignores modes: a key others can read is not a secret
            private.unlink()
            raise SyncError(
                f"{private} ended up with mode {mode:04o}; refusing to keep a "
                "private key that group or others can access"
            )
        kid = signing.key_id(key)
        public.write_text(f"# lineside manifest key {kid}\n{signing.public_key_bytes(key).hex()}\n")
        public.chmod(0o644)
        click.echo(kid)
        click.echo(f"private key: {private} (mode 0600)", err=True)
        click.echo(
            f'public key:  {public} -> device configs: [trusted_keys] {kid} = "{public.name}"',
            err=True,
        )


# ---- sync -----------------------------------------------------------------------------------


@click.group()
@_debug_option
def sync() -> None:
    """Deploy registry promotions to the fleet over MQTT."""


@sync.command("once")
@_debug_option
@_config_option
@click.option(
    "--settle",
    type=float,
    default=1.0,
    show_default=True,
    help="Seconds to collect device messages before the pass (rollout gates).",
)
@click.option("-v", "--verbose", is_flag=True)
def sync_once(config_path: Path, settle: float, verbose: bool) -> None:
    """Run one reconcile pass and exit (for cron and CI)."""
    from registry_sync.service import SyncService

    _logging(verbose)
    with _errors():
        service = SyncService(_load(config_path))
        try:
            service.connect()
            if settle > 0:
                time.sleep(settle)
            report = service.reconcile()
        finally:
            service.close()
        click.echo(report.summary())
        for line in report.blocked:
            click.echo(f"blocked: {line}", err=True)
        for line in report.failed:
            click.echo(f"failed: {line}", err=True)
        if report.blocked or report.failed:
            sys.exit(2)


@sync.command("run")
@_debug_option
@_config_option
@click.option("-v", "--verbose", is_flag=True)
def sync_run(config_path: Path, verbose: bool) -> None:
    """Run the sync service until SIGTERM/SIGINT."""
    from registry_sync.service import SyncService

    _logging(verbose)
    with _errors():
        service = SyncService(_load(config_path))
        stop = threading.Event()

        def _stop(_sig: int, _frame: Any) -> None:
            stop.set()
            service.wake.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        service.run(stop)


# ---- rollout --------------------------------------------------------------------------------


@click.group()
@_debug_option
def rollout() -> None:
    """Show staged rollouts."""


@rollout.command("status")
@_debug_option
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def rollout_status(config_path: Path, as_json: bool) -> None:
    """Where each model's rollout stands (from the state dir)."""
    from registry_sync.state import read_json

    with _errors():
        config = _load(config_path)
        doc = read_json(config.state_dir / "rollouts.json", {})
        if as_json:
            click.echo(json.dumps(doc, indent=1, sort_keys=True))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title="rollouts")
        for col in ("model", "version", "status", "groups", "current", "since", "reason"):
            table.add_column(col)
        for model, r in sorted(doc.items()):
            groups = r.get("groups", [])
            live = groups if r.get("status") == "complete" else groups[: r.get("stage", 0) + 1]
            table.add_row(
                model,
                str(r.get("version")),
                str(r.get("status")),
                " > ".join(f"[b]{g}[/b]" if g in live else g for g in groups),
                groups[min(r.get("stage", 0), len(groups) - 1)] if groups else "",
                _ago(r.get("stage_started_at")),
                str(r.get("reason", "")),
            )
        Console().print(table)


# ---- fleet ----------------------------------------------------------------------------------


@click.group()
@_debug_option
def fleet() -> None:
    """Show device state and telemetry."""


def _ago(ts: Any, now: float | None = None) -> str:
    if not isinstance(ts, (int, float)) or ts <= 0:
        return "-"
    delta = max(0.0, (now or time.time()) - ts)
    if delta < 120:
        return f"{delta:.0f}s ago"
    if delta < 7200:
        return f"{delta / 60:.0f}m ago"
    return f"{delta / 3600:.1f}h ago"


def fleet_rows(
    doc: dict[str, Any], *, now: float | None = None, offline_after_s: float = 0.0
) -> list[dict[str, Any]]:
    """One row per (device, model) from a FleetView JSON document.

    With ``offline_after_s`` > 0, a device whose last message is older than that shows
    offline even if its retained state says online (``stale``: e.g. a broker that lost
    the device's will kept its last "online")."""
    now = time.time() if now is None else now
    rows = []
    for name, rec in sorted(doc.get("devices", {}).items()):
        models = rec.get("models") or {"": {}}
        reported = bool(rec.get("online"))
        last_seen = rec.get("last_seen")
        silent = (
            offline_after_s > 0
            and isinstance(last_seen, (int, float))
            and now - last_seen > offline_after_s
        )
        for model, info in sorted(models.items()):
            tel = (rec.get("telemetry") or {}).get(model, {})
            psi = tel.get("psi") or {}
            rows.append(
                {
                    "device": name,
                    "online": reported and not silent,
                    "stale": reported and silent,
                    "model": model or None,
                    "version": info.get("version"),
                    "variant": info.get("variant"),
                    "p99_ms": tel.get("p99_ms"),
                    "throughput": tel.get("throughput"),
                    "drift_max_psi": max(psi.values()) if psi else None,
                    "drift": psi,
                    "last_seen": rec.get("last_seen"),
                }
            )
    return rows


def _collect(config: Any, wait_s: float) -> dict[str, Any]:
    """Merge the service's saved snapshot with the retained device states on the broker."""
    from edge_agent.protocol.topics import Topics
    from registry_sync.fleet import FleetMonitor, FleetView
    from registry_sync.state import read_json

    view = FleetView()
    view.load(read_json(config.state_dir / "fleet.json", {}))
    link = _started_link(config, "cli")
    try:
        FleetMonitor(link, Topics(config.topic_root), view, time.time).start()
        time.sleep(wait_s)
    finally:
        link.stop(timeout=2.0)
    return view.to_json()


def _table(rows: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    table = Table(title=f"fleet ({len({r['device'] for r in rows})} devices)")
    for col in (
        "device",
        "online",
        "model",
        "version",
        "variant",
        "p99 ms",
        "rows/s",
        "drift (max PSI)",
        "last seen",
    ):
        table.add_column(col)
    now = time.time()
    for r in rows:
        table.add_row(
            r["device"],
            "[green]yes[/green]"
            if r["online"]
            else "[red]no (silent)[/red]"
            if r.get("stale")
            else "[red]no[/red]",
            r["model"] or "-",
            str(r["version"] or "-"),
            r["variant"] or "-",
            f"{r['p99_ms']:.2f}" if r["p99_ms"] is not None else "-",
            f"{r['throughput']:.1f}" if r["throughput"] is not None else "-",
            f"{r['drift_max_psi']:.3f}" if r["drift_max_psi"] is not None else "-",
            _ago(r["last_seen"], now),
        )
    return table


@fleet.command("status")
@_debug_option
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=1.0,
    show_default=True,
    help="Seconds to collect retained device states from the broker.",
)
def fleet_status(config_path: Path, as_json: bool, wait_s: float) -> None:
    """A table of devices: online, model, version, variant, p99, throughput, drift."""
    with _errors():
        config = _load(config_path)
        rows = fleet_rows(
            _collect(config, wait_s), offline_after_s=config.fleet.offline_after_s
        )
        if as_json:
            click.echo(json.dumps({"devices": rows}, indent=1, sort_keys=True))
            return
        from rich.console import Console

        Console().print(_table(rows))


@fleet.command("watch")
@_debug_option
@_config_option
@click.option("--interval", type=float, default=1.0, show_default=True)
def fleet_watch(config_path: Path, interval: float) -> None:
    """A live view of the fleet (Ctrl-C to quit)."""
    from rich.live import Live

    from edge_agent.protocol.topics import Topics
    from registry_sync.fleet import FleetMonitor, FleetView

    with _errors():
        config = _load(config_path)
        view = FleetView()
        link = _started_link(config, "watch")
        FleetMonitor(link, Topics(config.topic_root), view, time.time).start()
        render: Callable[[], Any] = lambda: _table(  # noqa: E731
            fleet_rows(view.to_json(), offline_after_s=config.fleet.offline_after_s)
        )
        try:
            with Live(render(), refresh_per_second=4) as live:
                while True:
                    time.sleep(interval)
                    live.update(render())
        except KeyboardInterrupt:
            pass
        finally:
            link.stop(timeout=2.0)


def _started_link(config: Any, role: str) -> Any:
    """A connected MQTT link (``MqttLink``) for a CLI command, with a client id of its own."""
    from edge_agent.errors import BrokerError
    from edge_agent.mqtt import LinkOptions, MqttLink
    from registry_sync.errors import BrokerUnavailableError

    b = config.broker
    link = MqttLink(
        LinkOptions(
            url=b.url,
            client_id=f"{b.client_id}-{role}-{os.getpid()}",
            username=b.username,
            password=b.password,
            ca=b.ca,
            cert=b.cert,
            key=b.key,
        )
    )
    try:
        link.start(wait=b.connect_timeout_s)
    except BrokerError as exc:
        raise BrokerUnavailableError(str(exc)) from exc
    return link
