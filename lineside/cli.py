"""The one `lineside` command.

Each subcommand group lives in the package that owns it and is imported only when it
is invoked, so `lineside agent ...` works in an install that has only the `agent`
extra (no mlflow, onnx, scikit-learn or tensorflow).
"""

from __future__ import annotations

import importlib

import click

from lineside import __version__

# group name -> "module:attribute"; the module is imported on first use only.
_GROUPS: dict[str, tuple[str, str]] = {
    "convert": ("converter.cli:convert", "Convert an MLflow model into verified edge bundles."),
    "keys": ("registry_sync.cli:keys", "Generate and inspect manifest signing keys."),
    "sync": ("registry_sync.cli:sync", "Deploy registry promotions to the fleet over MQTT."),
    "rollout": ("registry_sync.cli:rollout", "Show staged rollouts."),
    "fleet": ("registry_sync.cli:fleet", "Show device state and telemetry."),
    "agent": ("edge_agent.cli:agent", "Run the edge agent on a device."),
    "demo": ("lineside.demo:demo", "Run the whole loop on this machine."),
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_GROUPS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _GROUPS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target[0].split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            missing = exc.name or str(exc)
            raise click.ClickException(
                f"'lineside {cmd_name}' needs a package that is not installed ({missing}); "
                f"install the matching extra, e.g. pip install 'lineside[server]'"
            ) from None
        command = getattr(module, attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help text comes from the table so that `lineside --help` imports nothing heavy.
        rows = [(name, _GROUPS[name][1]) for name in sorted(_GROUPS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_LazyGroup)
@click.version_option(__version__, prog_name="lineside")
def cli() -> None:
    """lineside: MLflow models onto factory devices, verified, and kept running."""


def main() -> None:
    cli(prog_name="lineside")


if __name__ == "__main__":  # pragma: no cover
    main()
