"""`lineside demo`: the whole loop on this machine with real components.

MLflow on its embedded sqlite default (in the work dir), an MQTT broker (Mosquitto from
PATH, else amqtt in-process), a simulated press line, `lineside sync run` and
`lineside agent run` as subprocesses. Exits 0 only when every step happened.

Every step has a time budget (``budgets.STEP_BUDGETS_S``, summing to 120 s by default, or
``--time-budget`` spread in proportion); a step's deadline is the run's budget less what
the steps after it are budgeted, so a slow step may use what earlier ones left over. A
step past its deadline, any error and SIGTERM/SIGINT end the demo with one FAIL line
naming the step, the processes it started stopped, the summary and a non-zero exit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import click

from lineside.demo import files, summary
from lineside.demo.broker import DemoBroker, start_broker
from lineside.demo.budgets import DEFAULT_DURATION_S, serve_times, step_budgets, time_budget
from lineside.demo.errors import DemoError, DemoFailedError
from lineside.demo.monitor import Feeder, Monitor
from lineside.demo.summary import REFUSALS, SUMMARY_FILE
from lineside.demo.training import (
    ANOMALY_MODEL,
    QUALITY_MODEL,
    log_and_register,
    train_anomaly,
    train_quality,
)

ERROR_LOG = "demo-error.log"


class _Interrupted(BaseException):
    """SIGTERM or SIGINT. A BaseException so that no library's ``except Exception``
    swallows it on its way to the cleanup."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Overran(BaseException):
    """SIGALRM at a step's deadline, raised in whatever blocking call the step is in."""


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
            click.echo(f"[{entry[0]:6.1f}s] {status:4} {text}")
            sys.stdout.flush()


@dataclass
class Demo:
    workdir: Path
    duration: float
    headless: bool
    broker_choice: str
    device_config: Path = files.SHIPPED_DEVICE_CONFIG
    budget_s: float | None = None  # None: time_budget(duration)
    steps: Steps = field(init=False)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    broker: DemoBroker | None = None
    monitor: Monitor | None = None
    feeder: Feeder | None = None
    view: Any = None
    exit_code: int = 0
    error: str | None = None
    versions: dict[str, dict[str, int]] = field(default_factory=dict)  # role -> model -> v
    answers_check: dict[str, Any] = field(default_factory=dict)
    _names: dict[int, str] = field(default_factory=dict)
    _step: str = "start"
    _step_budget: float = 0.0
    _deadline: float = 0.0
    _budgets: dict[str, float] = field(default_factory=dict)
    _cleaning: bool = False
    # The signal or alarm the handler raised for, kept: a raise can be swallowed when
    # the handler runs inside a finaliser or a weakref callback ("Exception ignored
    # in ..."; seen with SQLAlchemy's), so the step loop raises it again.
    _caught: BaseException | None = None

    def __post_init__(self) -> None:
        self.steps = Steps(self.headless)
        if self.budget_s is None:
            self.budget_s = time_budget(self.duration)
        scale = self.budget_s / time_budget(self.duration)
        self._budgets = {k: v * scale for k, v in step_budgets(self.duration).items()}

    # --- orchestration ----------------------------------------------------------------

    def run(self) -> int:
        """Every step, then the cleanup and the summary; returns the exit code."""
        with self._signals():
            try:
                with self._live_view():
                    self._run_steps()
                self._raise_caught()
            except DemoError as exc:
                self._fail(f"step '{self._step}': {exc}")
            except _Overran:
                self._fail(f"step '{self._step}': {self._overran_message(None)}")
            except _Interrupted as exc:
                self._fail(f"stopped by {exc} during step '{self._step}'", 128 + exc.signum)
            except KeyboardInterrupt:
                self._fail(f"interrupted during step '{self._step}'", 130)
            except Exception as exc:
                log = self.workdir / ERROR_LOG
                with contextlib.suppress(OSError):
                    log.write_text(traceback.format_exc())
                self._fail(
                    f"step '{self._step}' failed: {type(exc).__name__}: {exc} "
                    f"(traceback in {log})"
                )
            finally:
                self._cleaning = True
                self._disarm()
                self._cleanup()
            self._summary()
        return self.exit_code

    def _fail(self, message: str, code: int = 1) -> None:
        self.error = " ".join(message.split())  # one line
        self.exit_code = code
        self.steps.say("FAIL", self.error)

    def _run_steps(self) -> None:
        v1, q1 = self._first_deploy()
        self._updates(v1, q1)

    def _first_deploy(self) -> tuple[int, int]:
        """Broker, configs and the agent; v1 of both models trained and deployed; v2 and
        the broken v3 trained while the sync service converts v1 (they run in parallel)."""
        say = self.steps.say
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self._in("device config"):
            files.load_device_config(self.device_config)  # a bad one fails before any start
        with self._in("broker"):
            uri = f"sqlite:///{self.workdir / 'mlflow.db'}"
            # Both: MLflow reads the registry URI separately, and an inherited
            # MLFLOW_REGISTRY_URI would send the model versions to another store.
            os.environ["MLFLOW_TRACKING_URI"] = uri
            os.environ["MLFLOW_REGISTRY_URI"] = uri
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            self.broker = start_broker(
                self.workdir / "broker", prefer=self.broker_choice, on_start=self._track
            )
            say("ok", f"MQTT broker: {self.broker.kind} on {self.broker.url}")
        with self._in("configs"):
            private, public, key_id = files.write_keys(self.workdir)
            agent_cfg = files.write_agent_config(
                self.workdir, self.broker.url, public, key_id, shipped=self.device_config
            )
            sync_cfg = files.write_sync_config(self.workdir, self.broker.url, private, agent_cfg)
            say(
                "ok",
                f"signing key {key_id}; device config {agent_cfg.name} "
                f"(from {self.device_config.name}); sync config {sync_cfg.name}",
            )
        with self._in("start agent"):
            # The agent starts (imports, connects, waits for manifests) while v1 trains.
            monitor = self.monitor = Monitor(
                self.broker.url, started=self.steps.started, clock=time.monotonic
            )
            monitor.start()
            self._spawn("agent", ["agent", "run", "--config", str(agent_cfg)])
            say("ok", f"started `lineside agent run --config {agent_cfg.name}`")

        with self._in("train v1"):
            self._mlflow_experiment()
            v1 = self._register(ANOMALY_MODEL, seed=1, promote=True)
            q1 = self._register(QUALITY_MODEL, seed=1, promote=True)
            self.versions["v1"] = {ANOMALY_MODEL: v1, QUALITY_MODEL: q1}
            say(
                "ok",
                f"trained and registered {ANOMALY_MODEL} v{v1} and {QUALITY_MODEL} v{q1}; "
                "alias @production set",
            )

        with self._in("deploy v1"):
            self._spawn("sync", ["sync", "run", "--config", str(sync_cfg)])
            say("ok", "started `lineside sync run`: it converts, signs and publishes v1")
            # Meanwhile (the sync service converts in its own process): the next versions.
            v2 = self._register(ANOMALY_MODEL, seed=2, n_estimators=150)
            self._check_procs()
            v3 = self._prepare_broken()
            self._check_procs()
            self.versions["v2"] = {ANOMALY_MODEL: v2}
            self.versions["v3"] = {ANOMALY_MODEL: v3}
            say(
                "ok",
                f"meanwhile trained {ANOMALY_MODEL} v{v2} on newer data and v{v3} whose "
                "golden outputs do not match its model (fault injection); neither promoted yet",
            )
            self._wait(
                lambda: (
                    monitor.active_version(ANOMALY_MODEL) == v1
                    and monitor.active_version(QUALITY_MODEL) == q1
                ),
                f"agent pulled, verified and activated {ANOMALY_MODEL} v{v1} "
                f"and {QUALITY_MODEL} v{q1}",
            )
        with self._in("predictions"):
            self.feeder = Feeder(self.broker.url)
            self.feeder.start()
            say("ok", "press line publishing sensor messages (3 presses, 40 msg/s)")
            self._wait(
                lambda: min(monitor.predictions[m] for m in files.MODELS) >= 20,
                "predictions flowing from both models",
            )
        return v1, q1

    def _updates(self, v1: int, q1: int) -> None:
        """v2 hot-swapped in, the broken v3 refused, every message answered, history."""
        say = self.steps.say
        monitor = self.monitor
        assert monitor is not None
        v2 = self.versions["v2"][ANOMALY_MODEL]
        v3 = self.versions["v3"][ANOMALY_MODEL]
        serve_v1, serve_v2, serve_end = serve_times(self.duration)
        self._serve("serve v1", serve_v1)

        with self._in("hot swap"):
            self._promote(ANOMALY_MODEL, v2)
            say("ok", f"alias @production -> {ANOMALY_MODEL} v{v2} (trained on newer data)")
            self._wait(
                lambda: monitor.active_version(ANOMALY_MODEL) == v2,
                f"agent hot-swapped to {ANOMALY_MODEL} v{v2}",
            )
        self._serve("serve v2", serve_v2)

        with self._in("refuse v3"):
            self._promote(ANOMALY_MODEL, v3)
            say(
                "ok",
                f"alias @production -> {ANOMALY_MODEL} v{v3}, whose golden outputs do not "
                "match its model (fault injection)",
            )
            self._wait(
                lambda: self._refused(ANOMALY_MODEL, v3) is not None,
                f"agent refused the broken v{v3} (golden outputs do not match)",
            )
            if monitor.active_version(ANOMALY_MODEL) != v2:
                raise DemoFailedError(f"the device is not serving v{v2} after the broken v{v3}")
            say("ok", f"device still serving {ANOMALY_MODEL} v{v2}")
        self._serve("serve to the end", serve_end)

        with self._in("answers"):
            self._check_answers(v1, v2, v3, q1)
        with self._in("history"):
            self._wait(
                self._history_in_mlflow,
                "deployment history and device telemetry recorded in MLflow",
            )

    def _refused(self, model: str, version: int) -> str | None:
        """The code of the event that refused or rolled back ``model`` v``version``."""
        assert self.monitor is not None
        with self.monitor.lock:
            events = [e for _, e in self.monitor.events]
        for event in events:
            if (
                event.get("code") in REFUSALS
                and event.get("model") == model
                and event.get("version") == version
            ):
                return str(event["code"])
        return None

    def _check_answers(self, v1: int, v2: int, v3: int, q1: int) -> None:
        """Every sensor message answered by both models, by the versions that were live.

        The anomaly model's answers, in the order the messages were sent, must be v1 then
        v2 (the hot swap), with none from the refused v3; the quality model was never
        swapped, so v1 answered all of them.
        """
        assert self.feeder is not None and self.monitor is not None
        self.feeder.stop()
        sent = list(self.feeder.sent_ids)
        order = {ident: i for i, ident in enumerate(sent)}
        missing: dict[str, int] = {}
        answered: dict[str, dict[str, int]] = {}

        def all_answered() -> bool:
            assert self.monitor is not None
            with self.monitor.lock:
                for model in files.MODELS:
                    answered[model] = dict(self.monitor.answered[model])
            for model in files.MODELS:
                missing[model] = sum(1 for ident in sent if ident not in answered[model])
            return not any(missing.values())

        with contextlib.suppress(DemoFailedError):
            self._wait(all_answered, "every sensor message answered", quiet=True)
        all_answered()
        by_version: dict[str, dict[int, list[int]]] = {}
        for model in files.MODELS:
            spans: dict[int, list[int]] = {}
            for ident, version in answered[model].items():
                if ident in order:
                    spans.setdefault(version, []).append(order[ident])
            by_version[model] = spans
        self.answers_check = {
            "sent": len(sent),
            "missing": dict(missing),
            "by_version": {
                model: {
                    str(v): {"messages": len(ix), "first": min(ix) + 1, "last": max(ix) + 1}
                    for v, ix in sorted(spans.items())
                }
                for model, spans in by_version.items()
            },
        }
        if any(missing.values()):
            lost = ", ".join(f"{m}: {n}" for m, n in missing.items() if n)
            raise DemoFailedError(f"of {len(sent)} sensor messages, got no prediction from {lost}")
        anomaly = by_version[ANOMALY_MODEL]
        if anomaly.get(v3):
            raise DemoFailedError(
                f"the refused {ANOMALY_MODEL} v{v3} answered {len(anomaly[v3])} messages"
            )
        unexpected = sorted(set(anomaly) - {v1, v2})
        if unexpected or v1 not in anomaly or v2 not in anomaly:
            raise DemoFailedError(
                f"{ANOMALY_MODEL} answers came from versions {sorted(anomaly)}, "
                f"expected v{v1} then v{v2}"
            )
        if not (min(anomaly[v1]) < min(anomaly[v2]) and max(anomaly[v1]) < max(anomaly[v2])):
            raise DemoFailedError(
                f"{ANOMALY_MODEL} v{v1} and v{v2} did not answer in swap order "
                f"(v{v1}: messages {min(anomaly[v1]) + 1}-{max(anomaly[v1]) + 1}, "
                f"v{v2}: {min(anomaly[v2]) + 1}-{max(anomaly[v2]) + 1})"
            )
        quality = by_version[QUALITY_MODEL]
        if set(quality) != {q1}:
            raise DemoFailedError(
                f"{QUALITY_MODEL} answers came from versions {sorted(quality)}, expected v{q1}"
            )
        self.steps.say(
            "ok",
            f"all {len(sent)} sensor messages answered by {ANOMALY_MODEL} and {QUALITY_MODEL}, "
            f"none dropped across the hot swap and the refused update: {ANOMALY_MODEL} "
            f"v{v1} answered messages 1-{max(anomaly[v1]) + 1}, v{v2} "
            f"{min(anomaly[v2]) + 1}-{len(sent)}, v{v3} none; {QUALITY_MODEL} v{q1} all",
        )

    def _history_in_mlflow(self) -> bool:
        from mlflow import MlflowClient

        client = MlflowClient()
        v2 = self.versions["v2"][ANOMALY_MODEL]
        tags = client.get_model_version(ANOMALY_MODEL, str(v2)).tags
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

    def _register(
        self, model_name: str, *, seed: int, n_estimators: int = 100, promote: bool = False
    ) -> int:
        """Train, log and register a version (``@production`` on it if ``promote``)."""
        if model_name == ANOMALY_MODEL:
            model, frame = train_anomaly(seed, n_estimators)
            params: dict[str, Any] = {"seed": seed, "n_estimators": n_estimators}
        else:
            model, frame = train_quality(seed)
            params = {"seed": seed}
        registered = log_and_register(
            model, frame, model_name, experiment="press-line", params=params
        )
        version = int(registered.version)
        if promote:
            self._promote(model_name, version)
        return version

    def _promote(self, model_name: str, version: int) -> None:
        from mlflow import MlflowClient

        MlflowClient().set_registered_model_alias(model_name, "production", str(version))

    def _prepare_broken(self) -> int:
        """Register v3 and poison its cached build's golden outputs (promoted later).

        Fault injection: this stands for a build whose model behaves differently on the
        device than where it was converted (a runtime mismatch, a corrupted build cache).
        The manifest is properly signed; only the on-device golden check can catch it.
        """
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
        return int(broken.version)

    def _track(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        """Every process the demo starts, recorded as soon as it exists (for cleanup)."""
        self.procs.append(proc)
        self._names[id(proc)] = name

    def _spawn(self, name: str, args: list[str]) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with (self.workdir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lineside.cli", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=env,
            )
        self._track(name, proc)

    def _serve(self, name: str, seconds: float) -> None:
        """Let the press line run on the current version for ``seconds``."""
        with self._in(name):
            # A late run serves less rather than fail: this wait is the demo's own.
            until = min(time.monotonic() + seconds, self._deadline)
            self._wait(lambda: False, name, until=until)

    def _wait(
        self,
        condition: Callable[[], bool],
        what: str,
        *,
        until: float | None = None,
        quiet: bool = False,
    ) -> None:
        """Poll ``condition`` until the step's deadline (or ``until``: then it is no error
        that the condition stayed false). Fails at once if a component exited."""
        while True:
            self._raise_caught()
            self._check_procs()
            if condition():
                if not quiet:
                    self.steps.say("ok", what)
                return
            now = time.monotonic()
            if until is not None and now >= until:
                return
            if now >= self._deadline:
                raise DemoFailedError(self._overran_message(what))
            time.sleep(0.2)

    def _raise_caught(self) -> None:
        """Raise again a signal's exception that never reached the step (see _caught)."""
        caught, self._caught = self._caught, None
        if caught is not None and not self._cleaning and self.error is None:
            raise caught

    def _check_procs(self) -> None:
        """``DemoFailedError`` if the broker, the agent or the sync service has exited."""
        for proc in self.procs:
            if proc.poll() is not None:
                name = self._names.get(id(proc), "component")
                where = (
                    f"see {self.workdir / (name + '.log')}"
                    if name in ("agent", "sync")
                    else f"see {self.workdir / 'broker'}"
                )
                raise DemoFailedError(f"`{name}` exited early (code {proc.returncode}); {where}")

    def _overran_message(self, what: str | None) -> str:
        elapsed = time.monotonic() - self.steps.started
        doing = f"; still waiting for: {what}" if what else ""
        return (
            f"overran its time budget ({self._step_budget:.0f}s; "
            f"{elapsed:.0f}s into the run's {self.budget_s:.0f}s){doing}"
        )

    # --- time budget and signals ------------------------------------------------------

    @contextlib.contextmanager
    def _in(self, step: str) -> Iterator[None]:
        """Run a step against its deadline: the run's budget less the budgets of the steps
        after it (a slow step may use what earlier ones left, never what later ones need).
        SIGALRM interrupts a blocking call (training, a conversion) a little after the
        deadline that ``_wait`` polls for."""
        order = list(self._budgets)
        later = sum(self._budgets[s] for s in order[order.index(step) + 1 :])
        assert self.budget_s is not None
        self._step = step
        self._step_budget = self._budgets[step]
        self._deadline = self.steps.started + self.budget_s - later
        self._arm(self._deadline + 1.0)
        try:
            yield
        finally:
            self._disarm()

    def _main_thread(self) -> bool:
        return threading.current_thread() is threading.main_thread()

    def _arm(self, at: float) -> None:
        if self._main_thread() and hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, max(0.01, at - time.monotonic()))

    def _disarm(self) -> None:
        if self._main_thread() and hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        if not self._main_thread():
            yield
            return

        # Once the demo is failing or cleaning up, a signal must not cut that short.
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            if not self._cleaning and self.error is None:
                self._caught = _Interrupted(signum)
                raise self._caught

        def on_alarm(_signum: int, _frame: FrameType | None) -> None:
            if not self._cleaning and self.error is None:
                self._caught = _Overran()
                raise self._caught

        previous = {
            sig: signal.signal(sig, handler)
            for sig, handler in (
                (signal.SIGTERM, on_signal),
                (signal.SIGINT, on_signal),
                *([(signal.SIGALRM, on_alarm)] if hasattr(signal, "SIGALRM") else []),
            )
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

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
        """Stop everything started, each part even if another part fails to stop."""
        parts: list[tuple[str, Callable[[], None]]] = [
            ("press line", lambda: self.feeder.stop() if self.feeder else None),
            ("agent and sync", self._stop_procs),
            ("monitor", lambda: self.monitor.stop() if self.monitor else None),
            ("broker", lambda: self.broker.stop() if self.broker else None),
            ("remaining processes", self._kill_leftovers),
        ]
        for what, stop in parts:
            try:
                stop()
            except Exception as exc:  # the others must still stop
                click.echo(f"lineside demo: stopping the {what} failed: {exc}", err=True)

    def _stop_procs(self) -> None:
        # The broker last: the agent publishes its offline state on the way out.
        procs = [p for p in self.procs if self._names.get(id(p)) != "mosquitto"]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def _kill_leftovers(self) -> None:
        """Whatever is still running (a broker whose start failed half-way): killed."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)

    # --- the summary -----------------------------------------------------------------

    def summary_data(self) -> dict[str, Any]:
        """What happened, for the printed summary and ``demo-summary.json``."""
        run = {
            "ok": self.exit_code == 0,
            "exit_code": self.exit_code,
            "error": self.error,
            "elapsed_s": round(time.monotonic() - self.steps.started, 1),
            "time_budget_s": round(self.budget_s or 0.0, 1),
            "duration_s": self.duration,
            "device_config": str(self.device_config),
            "steps": [
                {"at_s": round(t, 1), "status": s, "text": text}
                for t, s, text in self.steps.lines
            ],
            "versions": self.versions,
            "answers": self.answers_check,
            "mlflow_ui": f"mlflow ui --backend-store-uri sqlite:///{self.workdir / 'mlflow.db'}",
        }
        return summary.build(run, self.monitor, self.steps.started)

    def _summary(self) -> None:
        data = self.summary_data()
        with contextlib.suppress(OSError):
            (self.workdir / SUMMARY_FILE).write_text(json.dumps(data, indent=2) + "\n")
        summary.echo_summary(data, self.workdir, self.error)


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
    type=click.FloatRange(min=0),
    default=DEFAULT_DURATION_S,
    show_default=True,
    help="Seconds the press line runs on the deployed versions, besides the update steps.",
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
    "--device-config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=files.SHIPPED_DEVICE_CONFIG,
    show_default="device_configs/raspberry-pi-5.toml",
    help="The device class config the agent runs (site settings replaced for the demo).",
)
@click.option(
    "--time-budget",
    type=click.FloatRange(min=1),
    default=None,
    help="Seconds the whole run may take before it fails naming the step that overran "
    "[default: the step budgets plus --duration, under 2 minutes by default].",
)
@click.option(
    "--fresh/--reuse", default=True, show_default=True, help="Start from an empty work dir."
)
def demo(
    workdir: Path,
    duration: float,
    headless: bool,
    broker_choice: str,
    device_config: Path,
    time_budget: float | None,
    fresh: bool,
) -> None:
    """Run the whole loop on this machine: MLflow -> convert -> sign -> MQTT -> agent."""
    workdir = workdir.resolve()
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    code = Demo(
        workdir,
        duration,
        headless,
        broker_choice,
        device_config=device_config.resolve(),
        budget_s=time_budget,
    ).run()
    sys.exit(code)
