"""``lineside agent run | predict | status``: the edge agent's command line.

Errors an operator can fix (a bad config, no model installed, a broker URL that does not
parse) are one line on stderr and a non-zero exit; ``--debug`` shows the traceback.
Imports stay light: no mlflow, onnx, scikit-learn, pandas, tensorflow, cryptography or
yaml (a test runs ``agent predict`` and checks ``sys.modules``).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from edge_agent.config import AgentConfig, ModelConfig, load_config
from edge_agent.errors import AgentError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_ERROR = 2

_config_option = click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Device config (TOML).",
)


def _fail(ctx: click.Context, exc: BaseException) -> None:
    if ctx.find_root().params.get("debug") or (ctx.obj or {}).get("debug"):
        raise exc
    click.echo(f"lineside agent: {exc}", err=True)
    ctx.exit(EXIT_ERROR)


def _load(ctx: click.Context, path: Path) -> AgentConfig:
    try:
        return load_config(path)
    except AgentError as exc:
        _fail(ctx, exc)
        raise  # unreachable: _fail exits


def _pick_model(config: AgentConfig, name: str | None) -> ModelConfig:
    if name is None:
        return config.models[0]
    for model in config.models:
        if model.name == name:
            return model
    known = ", ".join(m.name for m in config.models)
    raise AgentError(f"model {name!r} is not in the config (configured: {known})")


@click.group()
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.pass_context
def agent(ctx: click.Context, debug: bool) -> None:
    """Run the edge agent on a device."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@agent.command()
@_config_option
@click.pass_context
def run(ctx: click.Context, config_path: Path) -> None:
    """Serve predictions and take signed updates until SIGTERM."""
    config = _load(ctx, config_path)
    from edge_agent.agent import Agent

    # Work moves between threads (network -> batch worker -> outbox pump -> network); with
    # CPython's default 5 ms GIL slice each hand-off can wait that long behind a busy
    # thread. 0.5 ms keeps hand-offs short at a small cost in switching.
    sys.setswitchinterval(0.0005)
    try:
        the_agent = Agent(config)
        the_agent.start()
    except AgentError as exc:
        _fail(ctx, exc)
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: the_agent.request_stop())
    code = the_agent.run()
    if code == 0:
        the_agent.stop()
    ctx.exit(code)


@agent.command()
@_config_option
@click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="CSV with a header row, or JSON lines (.jsonl).",
)
@click.option(
    "--output",
    "output_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON lines out.",
)
@click.option(
    "--model", "model_name", default=None, help="Model name from the config (default: the first)."
)
@click.pass_context
def predict(
    ctx: click.Context,
    config_path: Path,
    input_path: Path,
    output_path: Path,
    model_name: str | None,
) -> None:
    """Answer a file of sensor rows with the installed model; no broker needed."""
    config = _load(ctx, config_path)
    from edge_agent.offline import predict_file

    try:
        model = _pick_model(config, model_name)
        with output_path.open("w", encoding="utf-8") as out:
            summary = predict_file(config, model, input_path, out)
    except (AgentError, OSError) as exc:
        _fail(ctx, exc)
        return
    click.echo(
        f"{summary.messages} messages: {summary.answered} answered, "
        f"{summary.rejected} rejected -> {output_path}",
        err=True,
    )


@agent.command()
@_config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, config_path: Path, as_json: bool) -> None:
    """Active models, versions, sequences, bad marks and outbox depth."""
    config = _load(ctx, config_path)
    from edge_agent.offline import read_status

    try:
        report = read_status(config)
    except AgentError as exc:
        _fail(ctx, exc)
        return
    if as_json:
        click.echo(json.dumps(report, indent=1, sort_keys=True))
        return
    click.echo(f"device {report['device']}  state {report['state_dir']}")
    for name, entry in report["models"].items():
        active = entry.get("active")
        if active:
            click.echo(
                f"  {name}: version {active['version']} {active['variant']} "
                f"seq {active['sequence']} sha256 {active['sha256'][:12]} "
                f"(history {len(entry['history'])})"
            )
        else:
            click.echo(f"  {name}: no model installed")
    for stream, seq in sorted(report["accepted_sequences"].items()):
        click.echo(f"  accepted {stream}: sequence {seq}")
    for sha, issued in sorted(report["bad"].items()):
        click.echo(f"  bad {sha[:12]} (issued_at {issued})")
    outbox = report["outbox"]
    click.echo(f"  outbox: {outbox.get('depth')} waiting, {outbox.get('dropped')} dropped")
