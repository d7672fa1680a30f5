"""`lineside demo`: the whole loop on this machine with real components.

MLflow on its embedded sqlite default (in the work dir), an MQTT broker (Mosquitto from
PATH, else amqtt in-process), a simulated press line, `lineside sync run` and
`lineside agent run` as subprocesses. Exits 0 only when every step happened.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from lineside.demo import files
from lineside.demo.broker import DemoBroker, start_broker
from lineside.demo.monitor import Feeder, Monitor
from lineside.demo.training import (
    ANOMALY_MODEL,
    QUALITY_MODEL,
    log_and_register,
    train_anomaly,
    train_quality,
)


class DemoFailedError(Exception):
    """A step did not happen as described."""


@dataclass
class Steps:
    """The demo's step log, printed as lines (--headless) or shown in the live view."""

    headless: bool
    lines: list[tuple[float, str, str]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    failed: bool = False

    def say(self, status: str, text: str) -> None:
        entry = (time.monotonic() - self.started, status, text)
        self.lines.append(entry)
        if status == "FAIL":
            self.failed = True
        if self.headless:
            click.echo(f"[{entry[0]:6.1f}s] {status:4} {text}", err=False)
            sys.stdout.flush()


@dataclass
class Demo:
    workdir: Path
    duration: float
    headless: bool
    broker_choice: str
    steps: Steps = field(init=False)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    broker: DemoBroker | None = None
    monitor: Monitor | None = None
    feeder: Feeder | None = None
    view: Any = None
    _names: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.steps = Steps(self.headless)

    # --- orchestration ----------------------------------------------------------------

    def run(self) -> bool:
        try:
            with self._live_view():
                self._run_steps()
        except DemoFailedError as exc:
            self.steps.say("FAIL", str(exc))
        finally:
            self._cleanup()
        self._summary()
        return not self.steps.failed

    def _run_steps(self) -> None:
        say = self.steps.say
        self.workdir.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{self.workdir / 'mlflow.db'}"
        # Both: MLflow reads the registry URI separately, and an inherited
        # MLFLOW_REGISTRY_URI would send the model versions to another store.
        os.environ["MLFLOW_TRACKING_URI"] = uri
        os.environ["MLFLOW_REGISTRY_URI"] = uri
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.broker = start_broker(self.workdir / "broker", prefer=self.broker_choice)
        say("ok", f"MQTT broker: {self.broker.kind} on {self.broker.url}")
        private, public, key_id = files.write_keys(self.workdir)
        agent_cfg = files.write_agent_config(self.workdir, self.broker.url, public, key_id)
        sync_cfg = files.write_sync_config(self.workdir, self.broker.url, private, agent_cfg)
        say(
            "ok",
            f"signing key {key_id}; device config {agent_cfg.name}; sync config {sync_cfg.name}",
        )

        self._mlflow_experiment()
        v1 = self._register(seed=1)
        say(
            "ok",
            f"trained and registered {ANOMALY_MODEL} v{v1} and {QUALITY_MODEL} v1; "
            "alias @production set",
        )

        monitor = self.monitor = Monitor(self.broker.url)
        monitor.start()
        self.procs.append(self._spawn("agent", ["agent", "run", "--config", str(agent_cfg)]))
        self.procs.append(self._spawn("sync", ["sync", "run", "--config", str(sync_cfg)]))
        names = {id(p): n for p, n in zip(self.procs, ("agent", "sync"), strict=True)}
        self._names = names
        say("ok", "started `lineside agent run` and `lineside sync run`")
        self._wait(
            lambda: (
                monitor.active_version(ANOMALY_MODEL) == int(v1)
                and monitor.active_version(QUALITY_MODEL) is not None
            ),
            # converting both models the first time is the slow part on a busy machine
            150,
            f"agent pulled, verified and activated {ANOMALY_MODEL} v{v1}",
        )
        self.feeder = Feeder(self.broker.url)
        self.feeder.start()
        say("ok", "press line publishing sensor messages (3 presses, 40 msg/s)")
        self._wait(lambda: monitor.predictions[ANOMALY_MODEL] >= 20, 20, "predictions flowing")
        time.sleep(min(5.0, self.duration / 10))

        v2 = self._register(seed=2, anomaly_only=True, n_estimators=150)
        say("ok", f"trained {ANOMALY_MODEL} v{v2} on newer data; alias @production -> v{v2}")
        self._wait(
            lambda: monitor.active_version(ANOMALY_MODEL) == int(v2),
            60,
            f"agent hot-swapped to {ANOMALY_MODEL} v{v2}",
        )
        time.sleep(min(5.0, self.duration / 10))

        v3 = self._promote_broken()
        self._wait(
            lambda: monitor.count("golden_mismatch") + monitor.count("rolled_back") > 0,
            60,
            f"agent refused the broken v{v3} (golden outputs do not match)",
        )
        if monitor.active_version(ANOMALY_MODEL) != int(v2):
            raise DemoFailedError(f"the device is not serving v{v2} after the broken v{v3}")
        say("ok", f"device still serving {ANOMALY_MODEL} v{v2}")
        remaining = self.duration - (time.monotonic() - self.steps.started)
        time.sleep(max(0.0, min(remaining, 10.0)))
        self._check_nothing_dropped()
        self._wait(
            self._history_in_mlflow,
            60,  # the sync service records on its own schedule; slower on a loaded machine
            "deployment history and device telemetry recorded in MLflow",
        )

    def _check_nothing_dropped(self) -> None:
        assert self.feeder is not None and self.monitor is not None
        self.feeder.stop()
        sent = set(self.feeder.sent_ids)
        deadline = time.monotonic() + 15
        missing: set[str] = sent
        while time.monotonic() < deadline:
            with self.monitor.lock:
                answered = set(self.monitor.answered[ANOMALY_MODEL])
            missing = sent - answered
            if not missing:
                break
            time.sleep(0.25)
        if missing:
            raise DemoFailedError(
                f"{len(missing)} of {len(sent)} sensor messages got no prediction"
            )
        self.steps.say(
            "ok",
            f"all {len(sent)} sensor messages answered by {ANOMALY_MODEL}, "
            "none dropped across the hot swap and the refused update",
        )

    def _history_in_mlflow(self) -> bool:
        from mlflow import MlflowClient

        client = MlflowClient()
        tags = client.get_model_version(ANOMALY_MODEL, "2").tags
        experiment = client.get_experiment_by_name("lineside-deployments")
        if experiment is None or not any(k.startswith("lineside.deployed.") for k in tags):
            return False
        runs = client.search_runs([experiment.experiment_id])
        return any("latency_p99_ms" in r.data.metrics for r in runs)

    # --- pieces -------------------------------------------------------------------

    def _mlflow_experiment(self) -> None:
        import mlflow

        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(os.environ["MLFLOW_REGISTRY_URI"])
        if mlflow.get_experiment_by_name("press-line") is None:
            mlflow.create_experiment(
                "press-line", artifact_location=(self.workdir / "artifacts").as_uri()
            )

    def _register(self, *, seed: int, anomaly_only: bool = False, n_estimators: int = 100) -> str:
        from mlflow import MlflowClient

        model, frame = train_anomaly(seed, n_estimators)
        anomaly = log_and_register(
            model,
            frame,
            ANOMALY_MODEL,
            experiment="press-line",
            params={"seed": seed, "n_estimators": n_estimators},
        )
        client = MlflowClient()
        client.set_registered_model_alias(ANOMALY_MODEL, "production", anomaly.version)
        if not anomaly_only:
            qmodel, qframe = train_quality(seed)
            quality = log_and_register(
                qmodel, qframe, QUALITY_MODEL, experiment="press-line", params={"seed": seed}
            )
            client.set_registered_model_alias(QUALITY_MODEL, "production", quality.version)
        return anomaly.version

    def _promote_broken(self) -> str:
        """Register v3 and poison its cached build's golden outputs, then promote it.

        Fault injection: this stands for a build whose model behaves differently on the
        device than where it was converted (a runtime mismatch, a corrupted build cache).
        The manifest is properly signed; only the on-device golden check can catch it.
        """
        from mlflow import MlflowClient

        from lineside.demo.faults import poison_cached_build

        model, frame = train_anomaly(3, 120)
        broken = log_and_register(
            model,
            frame,
            ANOMALY_MODEL,
            experiment="press-line",
            params={"seed": 3, "fault": "golden outputs poisoned"},
        )
        poison_cached_build(self.workdir / "sync.toml", ANOMALY_MODEL, int(broken.version))
        MlflowClient().set_registered_model_alias(ANOMALY_MODEL, "production", broken.version)
        self.steps.say(
            "ok",
            f"promoted {ANOMALY_MODEL} v{broken.version} whose golden outputs "
            "do not match its model (fault injection)",
        )
        return broken.version

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return subprocess.Popen(
            [sys.executable, "-m", "lineside.cli", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=env,
        )

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    name = self._names.get(id(proc), "component")
                    raise DemoFailedError(
                        f"`lineside {name}` exited early (code {proc.returncode}); "
                        f"see {self.workdir / (name + '.log')}"
                    )
            if condition():
                self.steps.say("ok", what)
                return
            time.sleep(0.2)
        raise DemoFailedError(f"timed out after {timeout:.0f}s waiting for: {what}")

    @contextlib.contextmanager
    def _live_view(self) -> Iterator[None]:
        if self.headless:
            yield
            return
        from lineside.demo.view import LiveView

        with LiveView(self) as view:
            self.view = view
            yield

    def _cleanup(self) -> None:
        if self.feeder is not None:
            self.feeder.stop()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self.monitor is not None:
            self.monitor.stop()
        if self.broker is not None:
            self.broker.stop()

    def _summary(self) -> None:
        ok = not self.steps.failed
        click.echo("")
        click.echo("lineside demo: " + ("every step happened" if ok else "FAILED"))
        if self.monitor is not None:
            m = self.monitor
            click.echo(
                f"  predictions: {dict(m.predictions)}; events: "
                f"{dict(m.event_codes.most_common(8))}"
            )
        click.echo(f"  work dir: {self.workdir}")
        click.echo("  see the deployment history and device metrics in the MLflow UI:")
        click.echo(f"    mlflow ui --backend-store-uri sqlite:///{self.workdir / 'mlflow.db'}")


@click.command("demo")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("lineside-demo"),
    show_default=True,
    help="Where MLflow, the broker, keys and logs live.",
)
@click.option(
    "--duration",
    type=float,
    default=60.0,
    show_default=True,
    help="Rough length of the run in seconds (it ends when every step happened).",
)
@click.option("--headless", is_flag=True, help="Print the steps as lines (for CI).")
@click.option(
    "--broker",
    "broker_choice",
    type=click.Choice(["auto", "mosquitto", "amqtt"]),
    default="auto",
    show_default=True,
    help="Which MQTT broker to start.",
)
@click.option(
    "--fresh/--reuse", default=True, show_default=True, help="Start from an empty work dir."
)
def demo(workdir: Path, duration: float, headless: bool, broker_choice: str, fresh: bool) -> None:
    """Run the whole loop on this machine: MLflow -> convert -> sign -> MQTT -> agent."""
    workdir = workdir.resolve()
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    ok = Demo(workdir, duration, headless, broker_choice).run()
    sys.exit(0 if ok else 1)
