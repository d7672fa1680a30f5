"""`lineside convert`: one MLflow model in, one verified bundle per edge variant out."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from converter.errors import ConverterError, InputSpecError, UnsupportedModelError

EXIT_FAILED = 1  # a variant failed to build or failed the parity gate
EXIT_ERROR = 2  # the command could not run (bad URI, unreachable server, bad input)


@click.command("convert")
@click.argument("model_uri", required=False)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Output directory.")
@click.option("--variant", "variants", multiple=True, help="A variant to build (repeatable).")
@click.option(
    "--target",
    "targets",
    multiple=True,
    type=click.Path(path_type=Path),
    help="A device config; builds the variants that device class prefers.",
)
@click.option(
    "--calibration-data",
    type=click.Path(path_type=Path),
    help="CSV/JSONL/.npy rows for static int8 and the parity gate.",
)
@click.option(
    "--tracking-uri",
    help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else MLflow's local sqlite default).",
)
@click.option(
    "--log-to-registry",
    is_flag=True,
    help="Log bundles to the source run and tag the model version.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--capabilities", is_flag=True, help="Print the estimator x variant matrix.")
@click.option(
    "--format",
    "capabilities_format",
    type=click.Choice(["text", "markdown", "json"]),
    default=None,
    help="How --capabilities prints the matrix: text (default), markdown (README's table), "
    "json (same as --json).",
)
@click.option(
    "--min-agreement-fp32",
    type=float,
    default=None,
    help="Label agreement an fp32 variant needs on validation rows (0.999).",
)
@click.option(
    "--min-agreement-reduced",
    type=float,
    default=None,
    help="Label agreement an fp16/int8 variant needs (0.99).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def convert(
    model_uri: str | None,
    out_dir: Path | None,
    variants: tuple[str, ...],
    targets: tuple[Path, ...],
    calibration_data: Path | None,
    tracking_uri: str | None,
    log_to_registry: bool,
    as_json: bool,
    capabilities: bool,
    capabilities_format: str | None,
    min_agreement_fp32: float | None,
    min_agreement_reduced: float | None,
    debug: bool,
) -> None:
    """Convert MODEL_URI (models:/NAME@ALIAS, models:/NAME/STAGE, models:/NAME/VERSION,
    models:/m-ID, runs:/RUN_ID/PATH or a local model directory) into edge bundles."""
    try:
        if capabilities_format is not None and not capabilities:
            raise click.UsageError("--format applies to --capabilities only (use --json)")
        if capabilities:
            _print_capabilities(_capabilities_format(capabilities_format, as_json=as_json))
            return
        if not model_uri or out_dir is None:
            raise click.UsageError("MODEL_URI and --out are required (or --capabilities)")
        chosen = _choose_variants(variants, targets)
        code = _run(
            model_uri,
            out_dir,
            chosen,
            calibration_data,
            tracking_uri,
            log_to_registry,
            as_json,
            min_agreement_fp32,
            min_agreement_reduced,
        )
    except click.UsageError:
        raise
    except ImportError as exc:
        if debug:
            raise
        click.echo(
            f"lineside convert: error: a server-side package is missing ({exc.name or exc}); "
            "install it with: pip install 'lineside[server]' (TFLite: 'lineside[tflite]')",
            err=True,
        )
        sys.exit(EXIT_ERROR)
    except ConverterError as exc:
        if debug:
            raise
        click.echo(f"lineside convert: error: {_one_line(exc)}", err=True)
        sys.exit(EXIT_ERROR)
    except Exception as exc:
        if debug:
            raise
        click.echo(
            f"lineside convert: unexpected error: {type(exc).__name__}: {_one_line(exc)} "
            "(rerun with --debug for the traceback)",
            err=True,
        )
        sys.exit(EXIT_ERROR)
    sys.exit(code)


def _run(
    model_uri: str,
    out_dir: Path,
    variants: list[str],
    calibration_data: Path | None,
    tracking_uri: str | None,
    log_to_registry: bool,
    as_json: bool,
    min_fp32: float | None,
    min_reduced: float | None,
) -> int:
    from converter.parity import ParityThresholds
    from converter.pipeline import convert as run_convert

    _limit_mlflow_retries()
    thresholds = ParityThresholds()
    if min_fp32 is not None:
        thresholds = _replace(thresholds, fp32_validation_agreement=min_fp32)
    if min_reduced is not None:
        thresholds = _replace(thresholds, reduced_agreement=min_reduced)
    with _Progress(enabled=not as_json) as progress:
        result = run_convert(
            model_uri,
            out_dir,
            variants=variants,
            calibration_data=calibration_data,
            tracking_uri=tracking_uri,
            thresholds=thresholds,
            progress=progress.update,
        )
    if log_to_registry and any(v.status == "written" for v in result.variants):
        from converter.registry_log import log_bundles

        log_bundles(result, tracking_uri=tracking_uri)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2, default=str))
    else:
        _print_summary(result)
    if not result.ok:
        if not any(v.status in ("written", "failed") for v in result.variants):
            click.echo(
                "lineside convert: error: no requested variant applies to this model "
                "(see the reasons above and `lineside convert --capabilities`)",
                err=True,
            )
        return EXIT_FAILED
    return 0


def _choose_variants(variants: tuple[str, ...], targets: tuple[Path, ...]) -> list[str]:
    from converter.variants import VARIANTS

    chosen = list(variants)
    for target in targets:
        chosen += _target_variants(target)
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise click.UsageError(
            f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}"
        )
    return list(dict.fromkeys(chosen)) or list(VARIANTS)


def _target_variants(path: Path) -> list[str]:
    from edge_agent.config import load_config
    from edge_agent.errors import ConfigError

    try:
        config = load_config(path, provisioned=False)
    except ConfigError as exc:
        raise InputSpecError(f"--target {path}: {exc}") from exc
    return list(config.variants)


def _limit_mlflow_retries() -> None:
    # MLflow retries an unreachable server for minutes by default; a CLI should say so fast.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def _replace(thresholds: Any, **changes: float) -> Any:
    from dataclasses import replace

    return replace(thresholds, **changes)


def _capabilities_format(chosen: str | None, *, as_json: bool) -> str:
    if as_json and chosen not in (None, "json"):
        raise click.UsageError(f"--json contradicts --format {chosen}; give one of them")
    return "json" if as_json else chosen or "text"


def _print_capabilities(fmt: str) -> None:
    from converter.capabilities import matrix, render_markdown, render_text

    table = matrix()
    if fmt == "json":
        click.echo(json.dumps(table, indent=2))
    elif fmt == "markdown":
        # README's "What converts to what" table is this output, verbatim (tests/test_docs.py).
        click.echo(render_markdown(table))
    else:
        click.echo(render_text(table))


def _print_summary(result: Any) -> None:
    src = result.source
    name = f"{src.registered_name} v{src.version}" if src.registered_name else src.uri
    click.echo(f"source: {name}" + (f" ({src.selector})" if src.selector else ""))
    if src.note:
        click.echo(f"note: {src.note}")
    for v in result.variants:
        if v.status == "written":
            p = v.parity
            agree = (
                f" label agreement {p.label_agreement_validation:.2%}"
                if p and p.label_agreement_validation is not None
                else ""
            )
            err = (
                f" max abs err {max(p.max_abs_error.values()):.2e}" if p and p.max_abs_error else ""
            )
            click.echo(f"  {v.variant:12} written  {v.size:>9} B{agree}{err}  -> {v.path}")
        else:
            click.echo(f"  {v.variant:12} {v.status:8} {v.reason}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class _Progress:
    """A rich progress display while variants build; silent for --json or no TTY."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                console=Console(stderr=True),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("resolving model", total=None)
        return self

    def update(self, variant: str, stage: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=f"{variant}: {stage}")

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


__all__ = ["EXIT_ERROR", "EXIT_FAILED", "UnsupportedModelError", "convert"]
