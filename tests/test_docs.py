"""The docs cannot rot: every `lineside ...` command they show parses against the real CLI,
and every documented subcommand is run for real by some test in this suite."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from lineside.cli import cli

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(bash|text)\n(.*?)```", re.S)


def _commands() -> list[tuple[str, str, str]]:
    """(file, fence language, command line) for every `lineside ...` line in a code block."""
    found = []
    for doc in DOCS:
        for lang, body in BLOCK.findall(doc.read_text()):
            joined = body.replace("\\\n", " ")
            for raw in joined.splitlines():
                code = raw.split("#", 1)[0].strip()
                for piece in code.split("&&"):
                    command = piece.strip()
                    if command.startswith("lineside "):
                        found.append((doc.name, lang, command))
    return found


COMMANDS = _commands()


def _resolve(words: list[str]) -> tuple[click.Command, list[str], list[str]]:
    command: click.Command = cli
    path: list[str] = []
    rest = words
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"no command {' '.join([*path, rest[0]])}"
        command, path, rest = sub, [*path, rest[0]], rest[1:]
    return command, path, rest


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize(
    ("doc", "lang", "line"), COMMANDS, ids=[f"{d}:{c}" for d, _, c in COMMANDS]
)
def test_documented_command_matches_the_cli(doc: str, lang: str, line: str) -> None:
    words = shlex.split(line)[1:]
    command, path, rest = _resolve(words)
    options = {opt for p in command.params for opt in getattr(p, "opts", [])}
    options |= {opt for p in command.params for opt in getattr(p, "secondary_opts", [])}
    for token in re.findall(r"(--[a-z][a-z0-9-]*)", " ".join(rest)):
        assert token in options, (
            f"{doc}: `{line}` uses {token}, unknown to lineside {' '.join(path)}"
        )
    if lang == "bash":
        # a concrete example names every required option
        for param in command.params:
            if getattr(param, "required", False) and isinstance(param, click.Option):
                assert any(o in rest for o in param.opts), f"{doc}: `{line}` lacks {param.opts[0]}"


DOCUMENTED = sorted({" ".join(_resolve(shlex.split(c)[1:])[1]) for _, _, c in COMMANDS})


@pytest.mark.parametrize("subcommand", DOCUMENTED)
def test_every_documented_subcommand_is_run_by_a_test(subcommand: str) -> None:
    words = subcommand.split()
    # the words in order, quoted as in an argument list (["agent", "predict", ...] or
    # ["agent", ...\n "predict"]) or as one string ("lineside agent predict ...")
    quoted = r"['\"]\s*,\s*(?:#[^\n]*\n\s*)?['\"]".join(re.escape(w) for w in words)
    pattern = re.compile(rf"['\"]{quoted}['\"]|{re.escape(' '.join(words))}")
    tests = [p for p in (REPO / "tests").rglob("test_*.py") if p.name != "test_docs.py"]
    hits = [p.name for p in tests if pattern.search(p.read_text())]
    assert hits, f"no test runs `lineside {subcommand}`"
