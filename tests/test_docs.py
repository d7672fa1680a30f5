"""The docs cannot rot.

- Every command README.md and docs/ (docs/adr/ included) show, in ```bash / ```text blocks
  and in `inline code` in running text, is checked against the real thing: a `lineside ...`
  command parses against the CLI (subcommand, options, choices), and some test invokes that
  subcommand with every option the docs use with it (found in the test files' call
  arguments, so "next to" means "in the same argument list"). Other commands are checked
  as far as that is cheap and honest: pip extras exist in pyproject.toml, pytest markers
  are declared and test paths exist, benchmark scripts accept the documented flags (their
  real `--help`), `mlflow server` knows the documented options, Mosquitto configs exist
  and are run by tests/test_broker_configs.py, systemd units and installed files exist,
  README's test command is the one .ci/run runs. A command no check knows fails.
- Paths of repository files the docs name exist.
- The Mosquitto directives the docs quote are what the shipped configs say.
- docs/operations.md section 8: every figure equals its key in benchmarks/results/*.json
  (rounded to the digits shown), so rerunning a benchmark without updating the docs fails.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import click
import pytest
import tomllib

from lineside.cli import _GROUPS, cli

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
COMMENT = re.compile(r"(?:^|\s)#.*$")
# First words of the commands the docs may show; an inline `span` starting with one of
# these is a command, a line of a ```bash block must start with one of them.
PROGRAMS = ("lineside", "pip", "python", "python3", "pytest", "bash", "mosquitto", "mlflow",
            "systemctl", "sudo")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


@dataclass(frozen=True)
class Documented:
    doc: str  # path relative to the repo
    where: str  # "bash", "text" (a synopsis) or "inline"
    line: str

    @property
    def words(self) -> list[str]:
        return shlex.split(self.line)

    def __str__(self) -> str:
        return f"{self.doc} ({self.where}): {self.line}"


def _prose(text: str) -> str:
    return FENCE.sub("", text)


def _block_lines(lang: str, body: str) -> Iterator[str]:
    joined = body.replace("\\\n", " ")
    lines: list[str] = []
    for raw in joined.splitlines():
        if lang == "text" and raw[:1].isspace() and lines:
            lines[-1] += " " + raw.strip()  # a synopsis continued on an indented line
        else:
            lines.append(raw)
    for line in lines:
        code = COMMENT.sub("", line).strip()
        for piece in code.split("&&"):
            if piece.strip():
                yield piece.strip()


def _expand(line: str) -> list[str]:
    """`lineside sync|keys|rollout|fleet` names four commands."""
    words = line.split()
    for i, word in enumerate(words):
        if word.startswith("-"):
            break
        if re.fullmatch(r"[a-z]+(\|[a-z]+)+", word):
            return [w for alt in word.split("|")
                    for w in _expand(" ".join([*words[:i], alt, *words[i + 1:]]))]
    return [line]


def _documented() -> list[Documented]:
    found: list[Documented] = []
    for path in DOCS:
        doc = str(path.relative_to(REPO))
        text = path.read_text()
        for lang, body in FENCE.findall(text):
            if lang not in ("bash", "text"):
                continue
            for line in _block_lines(lang, body):
                if lang == "text" and not line.startswith("lineside "):
                    continue  # a text block may hold output; its commands start with lineside
                found += [Documented(doc, lang, c) for c in _expand(line)]
        for span in INLINE.findall(_prose(text)):
            words = span.split()
            if len(words) >= 2 and words[0] in PROGRAMS:
                found += [Documented(doc, "inline", c) for c in _expand(span.strip())]
    return found


ALL = _documented()
LINESIDE = [d for d in ALL if d.words[0] == "lineside"]
OTHERS = [d for d in ALL if d.words[0] != "lineside"]


def test_the_docs_show_commands() -> None:
    assert len(LINESIDE) >= 30
    assert {d.where for d in LINESIDE} == {"bash", "text", "inline"}
    assert any(p.parent.name == "adr" for p in DOCS)  # docs/adr/ is read too
    # the quick start's two commands are among them
    assert Documented("README.md", "bash", "lineside demo") in ALL
    assert Documented("README.md", "bash", "bash .ci/run") in ALL


# ---- lineside commands -----------------------------------------------------------------


def _resolve(words: list[str]) -> tuple[click.Command, list[str], list[str]]:
    command: click.Command = cli
    path: list[str] = []
    rest = words
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"no command lineside {' '.join([*path, rest[0]])}"
        command, path, rest = sub, [*path, rest[0]], rest[1:]
    return command, path, rest


def _options(command: click.Command) -> dict[str, click.Parameter]:
    return {opt: p for p in command.params
            for opt in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]
            if opt.startswith("-")}


def _option_tokens(rest: list[str]) -> list[str]:
    return [t.split("=", 1)[0] for t in re.findall(r"(--[a-z][a-z0-9-]*(?:=\S*)?)", " ".join(rest))]


@pytest.mark.parametrize("documented", LINESIDE, ids=str)
def test_documented_command_matches_the_cli(documented: Documented) -> None:
    command, path, rest = _resolve(documented.words[1:])
    options = _options(command)
    for token in _option_tokens(rest):
        assert token in options, (
            f"{documented}: {token} is unknown to lineside {' '.join(path)}")
    # a documented value of a choice option is one of its choices (`--broker auto|amqtt`)
    tokens = [t.strip("[]") for t in rest]
    for i, token in enumerate(tokens[:-1]):
        param = options.get(token)
        if isinstance(param, click.Option) and isinstance(param.type, click.Choice):
            for value in tokens[i + 1].split("|"):
                if value.isupper():
                    continue  # a placeholder
                assert value in param.type.choices, f"{documented}: {token} {value}"
    if documented.where == "bash":
        # a concrete example names every required option
        for param in command.params:
            if getattr(param, "required", False) and isinstance(param, click.Option):
                assert any(o in rest for o in param.opts), f"{documented} lacks {param.opts[0]}"


# What tests invoke: the string arguments of every call in tests/test_*.py, with the words of
# a click command object passed or wrapped (`invoke(convert_cmd, ...)`, a `_run(*args)` helper
# around it) put in front, plus string literals that are whole `lineside ...` command lines.
COMMAND_OBJECTS: dict[str, list[str]] = {
    target: [name] for name, (target, _help) in _GROUPS.items()
} | {"lineside.cli:cli": []}


def _flatten(nodes: list[ast.expr]) -> list[str | None]:
    out: list[str | None] = []
    for node in nodes:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append(node.value)
        elif isinstance(node, ast.List | ast.Tuple):
            out += _flatten(list(node.elts))
        else:
            out.append(None)
    return out


def _invocations(source: str) -> list[list[str | None]]:
    tree = ast.parse(source)
    objects: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                words = COMMAND_OBJECTS.get(f"{node.module}:{alias.name}")
                if words:
                    objects[alias.asname or alias.name] = words
    # Module-level helpers that run a command with the arguments they are given: one that
    # passes them to a command object (`invoke(convert_cmd, list(args))`), or one that builds
    # `[python, "-m", "lineside.cli", "demo", "--headless", *extra]`; calls to the helper get
    # what it puts in front of the caller's arguments.
    helpers: dict[str, list[str]] = {}
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Call):
                for arg in node.args:
                    if isinstance(arg, ast.Name) and arg.id in objects:
                        helpers[fn.name] = objects[arg.id]
            elif isinstance(node, ast.List | ast.Tuple):
                flat = _flatten(list(node.elts))
                if "lineside.cli" in flat:
                    after = flat[flat.index("lineside.cli") + 1:]
                    helpers[fn.name] = [t for t in after if t is not None]
    calls: list[list[str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            front: list[str | None] = []
            if isinstance(node.func, ast.Name) and node.func.id in helpers:
                front = list(helpers[node.func.id])
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Name) and first.id in objects:
                front = list(objects[first.id])
            calls.append(front + _flatten(list(node.args)))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and node.value.startswith("lineside ")):
            try:
                calls.append(list(shlex.split(node.value)[1:]))
            except ValueError:
                continue
    return calls


@cache
def _test_invocations() -> list[tuple[str, list[str | None]]]:
    return [(p.name, call) for p in sorted((REPO / "tests").rglob("test_*.py"))
            if p.name != "test_docs.py" for call in _invocations(p.read_text())]


def _options_used_with(words: list[str]) -> list[tuple[str, set[str]]]:
    """(test file, options after the words) for each test call that runs `lineside WORDS`."""
    hits = []
    for name, call in _test_invocations():
        for start, token in enumerate(call):
            if token != words[0]:
                continue
            i, matched = start, 1
            while matched < len(words) and i + 1 < len(call):
                i += 1
                nxt = call[i]
                if nxt == words[matched]:
                    matched += 1
                elif not (nxt or "").startswith("--"):
                    break  # group options (`agent --debug status`) may sit between words
            if matched == len(words):
                tail = call[i + 1:]
                hits.append((name, {t.split("=", 1)[0] for t in tail
                                    if t is not None and t.startswith("--")}))
                break
    return hits


def _documented_usage() -> dict[str, set[str]]:
    usage: dict[str, set[str]] = {}
    for documented in LINESIDE:
        command, path, rest = _resolve(documented.words[1:])
        options = _options(command)
        used = usage.setdefault(" ".join(path), set())
        for token in _option_tokens(rest):
            if token in options:
                used.add(token)
    return usage


USAGE = _documented_usage()
USED_OPTIONS = sorted((sub, opt) for sub, opts in USAGE.items() for opt in opts)


@pytest.mark.parametrize("subcommand", sorted(USAGE))
def test_every_documented_subcommand_is_run_by_a_test(subcommand: str) -> None:
    assert _options_used_with(subcommand.split()), f"no test runs `lineside {subcommand}`"


@pytest.mark.parametrize(("subcommand", "option"), USED_OPTIONS,
                         ids=[f"{s} {o}" for s, o in USED_OPTIONS])
def test_every_documented_option_is_run_by_a_test(subcommand: str, option: str) -> None:
    command, _, _ = _resolve(subcommand.split())
    param = _options(command)[option]
    aliases = {o for o, p in _options(command).items() if p is param}
    runs = _options_used_with(subcommand.split())
    assert any(used & aliases for _, used in runs), (
        f"the docs show `lineside {subcommand} {option}` but no test passes {option} to it "
        f"(tests that run it: {sorted({name for name, _ in runs})})")


# ---- other commands --------------------------------------------------------------------


def _extras() -> set[str]:
    return set(PYPROJECT["project"]["optional-dependencies"])


def _markers() -> set[str]:
    markers = PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]
    return {m.split(":", 1)[0].strip() for m in markers}


@cache
def _help(*argv: str) -> str:
    proc = subprocess.run([sys.executable, *argv, "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, f"{' '.join(argv)} --help: {proc.stderr[-2000:]}"
    return proc.stdout


def _check_pip(words: list[str]) -> None:
    assert words[1] == "install", words
    specs = [w for w in words[2:] if not w.startswith("-")]
    assert specs, words
    for spec in specs:
        match = re.fullmatch(r"(\.|lineside)\[([\w,-]+)\]", spec)
        assert match, f"pip install {spec}: install lineside or '.' with extras"
        for extra in match.group(2).split(","):
            assert extra in _extras(), f"no extra [{extra}] in pyproject.toml"


def _check_pytest(args: list[str]) -> None:
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-m":
            names = set(re.findall(r"[A-Za-z_]\w*", args[i + 1])) - {"and", "or", "not"}
            assert names <= _markers(), f"undeclared pytest marker(s) {names - _markers()}"
            i += 2
            continue
        if arg.startswith("-"):
            assert arg in ("-q", "-x", "-v", "-ra"), f"pytest {arg}: add a check for it here"
        else:
            assert sorted(REPO.glob(arg)), f"pytest {arg}: no such test file"
        i += 1


def _check_python(words: list[str]) -> None:
    if words[1:3] == ["-m", "pytest"]:
        _check_pytest(words[3:])
        return
    if words[1] == "-m":
        # a test-support child process (`python -m tests.support.outage produce|drain ...`):
        # the module runs as a script and knows the documented modes
        module = REPO / (words[2].replace(".", "/") + ".py")
        assert words[2].startswith("tests.support.") and module.is_file(), words[2]
        source = module.read_text()
        assert 'if __name__ == "__main__":' in source, f"{words[2]} does not run as a script"
        for mode in (w for w in words[3:] if re.fullmatch(r"[a-z-]+(\|[a-z-]+)*", w)):
            for alt in mode.split("|"):
                assert f'"{alt}"' in source, f"{words[2]} knows no mode {alt!r}"
        return
    script = words[1]
    assert re.fullmatch(r"benchmarks/\w+\.py", script), f"{script}: add a check for it here"
    assert (REPO / script).is_file(), f"{script} does not exist"
    helptext = _help(script)
    for flag in _option_tokens(words[2:]):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helptext), (
            f"{script} does not accept {flag}")


def _check_mosquitto(words: list[str]) -> None:
    assert words[1] == "-c" and len(words) == 3, words
    name = Path(words[2]).name
    assert (REPO / "device_configs" / "mosquitto" / name).is_file(), name
    broker_tests = (REPO / "tests" / "test_broker_configs.py").read_text()
    assert f'render("{name}"' in broker_tests, f"tests/test_broker_configs.py never runs {name}"


def _check_mlflow(words: list[str]) -> None:
    assert words[1] == "server", words
    if not _option_tokens(words[2:]):
        return
    helptext = _help("-m", "mlflow", "server")
    for flag in _option_tokens(words[2:]):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helptext), (
            f"mlflow server has no {flag}")


def _check_systemctl(words: list[str]) -> None:
    units = [w for w in words[2:] if not w.startswith("-")]
    assert units, words
    for unit in units:
        name = unit if unit.endswith(".service") else f"{unit}.service"
        assert (REPO / "device_configs" / name).is_file(), f"no device_configs/{name}"


def _check_install(words: list[str]) -> None:
    args = words[1:]
    files = [a for i, a in enumerate(args)
             if not a.startswith("-") and not (i and args[i - 1] in ("-m", "-o", "-g"))]
    source = files[0]
    assert source == "/dev/null" or (REPO / source).is_file(), f"install: no {source}"


def _check_other(words: list[str]) -> None:
    program = words[0]
    if program == "sudo":
        if words[1] == "install":
            _check_install(words[1:])
            return
        _check_other(words[1:])
    elif program == "pip":
        _check_pip(words)
    elif program == "pytest":
        _check_pytest(words[1:])
    elif program in ("python", "python3"):
        _check_python(words)
    elif program == "bash":
        assert words[1:] == [".ci/run"], f"bash {words[1:]}: add a check for it here"
        assert os.access(REPO / ".ci" / "run", os.X_OK)
    elif program == "mosquitto":
        _check_mosquitto(words)
    elif program == "mlflow":
        _check_mlflow(words)
    elif program == "systemctl":
        _check_systemctl(words)
    else:
        raise AssertionError(f"{' '.join(words)}: no check knows {program!r}; add one here")


@pytest.mark.parametrize("documented", OTHERS, ids=str)
def test_documented_other_command_is_real(documented: Documented) -> None:
    words = documented.words
    assert words[0] in PROGRAMS, f"{documented}: add a check for {words[0]!r} in test_docs.py"
    _check_other(words)


def test_the_other_checks_cover_what_the_docs_show() -> None:
    programs = {d.words[0] for d in OTHERS} | {d.words[1] for d in OTHERS if d.words[0] == "sudo"}
    assert {"pip", "python3", "bash", "mosquitto", "mlflow", "systemctl", "install"} <= programs


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = [body.strip() for lang, body in FENCE.findall(quick) if lang == "bash"]
    pytest_lines = [b for b in blocks if "pytest" in b]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    ci_pytest = [line for line in ci if "pytest" in line]
    assert len(pytest_lines) == 1 and ci_pytest == pytest_lines, (pytest_lines, ci_pytest)
    assert ci[-1] == pytest_lines[0], "the test command must be what .ci/run ends with"
    assert blocks[0].endswith("lineside demo") and "bash .ci/run" in blocks


# ---- files the docs name ---------------------------------------------------------------

PATH = re.compile(
    r"(?<![\w/.{}-])((?:\.ci|benchmarks|converter|device_configs|docs|edge_agent|"
    r"registry_sync|tests)/[\w./*-]*[\w/*])"
)


def _named_paths() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        text = path.read_text()
        for name in sorted(set(PATH.findall(text))):
            out.append((str(path.relative_to(REPO)), name))
    return out


NAMED = _named_paths()


def test_the_docs_name_repository_files() -> None:
    assert len(NAMED) >= 40


@pytest.mark.parametrize(("doc", "name"), NAMED, ids=[f"{d}:{n}" for d, n in NAMED])
def test_named_repository_file_exists(doc: str, name: str) -> None:
    base = REPO / "docs" if doc.startswith("docs/") and name.startswith("adr/") else REPO
    assert sorted(base.glob(name.rstrip("/"))) or (base / name).exists(), (
        f"{doc} names {name}, which does not exist")


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
LINKS = [(str(p.relative_to(REPO)), target) for p in DOCS for target in LINK.findall(p.read_text())
         if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize(("doc", "target"), LINKS, ids=[f"{d}->{t}" for d, t in LINKS])
def test_relative_link_resolves(doc: str, target: str) -> None:
    assert ((REPO / doc).parent / target).exists(), f"{doc} links to {target}, which is missing"


# ---- the Mosquitto directives the docs quote -------------------------------------------

CONFS = sorted((REPO / "device_configs" / "mosquitto").glob("*.conf"))


def _conf_lines() -> dict[str, set[str]]:
    lines: dict[str, set[str]] = {}
    for conf in CONFS:
        for raw in conf.read_text().splitlines():
            line = " ".join(raw.split())
            if line and not line.startswith("#"):
                lines.setdefault(line.split()[0], set()).add(line)
    return lines


def test_docs_quote_the_shipped_broker_configs_exactly() -> None:
    directives = _conf_lines()
    checked = 0
    for name in ("README.md", "docs/operations.md", "docs/protocol.md"):
        for span in INLINE.findall(_prose((REPO / name).read_text())):
            words = span.split()
            if len(words) >= 2 and words[0] in directives:
                assert " ".join(words) in directives[words[0]], (
                    f"{name} says `{span}`, the shipped configs say "
                    f"{sorted(directives[words[0]])}")
                checked += 1
    assert checked >= 8


# ---- docs/operations.md section 8: figures from benchmarks/results/*.json ------------------

RESULTS = REPO / "benchmarks" / "results"
FIGURE = re.compile(r"(`[^`]*`)|(?<![\w.])(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)(%?)(?![\w.]*\d)")
STEP = re.compile(r"([^\[\]]+)(?:\[(\w+)=([^\]]+)\])?")


def _sizing_section() -> str:
    text = (REPO / "docs" / "operations.md").read_text()
    return text.split("\n## 8.", 1)[1].split("\n## ", 1)[0]


def _lookup(data: Any, path: str) -> Any:
    for part in path.split("."):
        match = STEP.fullmatch(part)
        assert match, f"bad key step {part!r} in {path}"
        name, field, want = match.groups()
        data = data[int(name)] if isinstance(data, list) else data[name]
        if field:
            picked = [e for e in data if str(e.get(field)) == want]
            assert len(picked) == 1, f"{path}: {len(picked)} entries with {field}={want}"
            data = picked[0]
    return data


def _value(data: Any, expression: str) -> Any:
    parts = [p.strip() for p in expression.split(" / ")]
    values = [_lookup(data, p) for p in parts]
    result = values[0]
    for v in values[1:]:
        result = result / v
    return result


def _agrees(text: str, percent: bool, value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    mantissa, _, exponent = text.lower().partition("e")
    decimals = len(mantissa.partition(".")[2])
    tolerance = 0.5 * 10.0 ** (int(exponent or 0) - decimals)
    number = float(text)
    if percent:
        number, tolerance = number / 100, tolerance / 100
    return math.isclose(number, value, abs_tol=tolerance * (1 + 1e-9))


@dataclass(frozen=True)
class Figure:
    source: str  # the JSON file name
    row: str  # the figure column
    shown: str  # as the doc shows it
    percent: bool
    key: str

    def __str__(self) -> str:
        return f"{self.source} {self.key} = {self.shown}{'%' if self.percent else ''}"


def _figures() -> list[Figure]:
    figures: list[Figure] = []
    source = ""
    for line in _sizing_section().splitlines():
        if not line.startswith("|"):
            named = re.findall(r"benchmarks/results/(\w+\.json)", line)
            source = named[-1] if named else source
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in ("figure", "") or set(cells[0]) <= set("-: "):
            continue
        assert len(cells) == 3 and source, f"section 8 row without a source: {line}"
        shown = [(m.group(1), m.group(2), m.group(3)) for m in FIGURE.finditer(cells[1])]
        keys = INLINE.findall(cells[2])
        assert len(shown) == len(keys) >= 1, (
            f"section 8: {len(shown)} figures but {len(keys)} keys in: {line}")
        for (string, number, percent), key in zip(shown, keys, strict=True):
            figures.append(Figure(source, cells[0], string or number, bool(percent), key))
        # numbers in the figure column are bound by a key's selector (`runs[devices=500]`)
        for number in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.]*\d)", cells[0]):
            assert any(f"={number}]" in k for k in keys), (
                f"section 8: {number} in '{cells[0]}' is not a figure checked against the JSON")
    return figures


FIGURES = _figures()


def test_sizing_section_cites_every_benchmark() -> None:
    assert len(FIGURES) >= 50
    cited = {f.source for f in FIGURES}
    assert cited == {p.name for p in RESULTS.glob("bench_*.json")}


def test_sizing_section_prose_quotes_no_figures() -> None:
    # Figures belong in the tables, where they are checked; prose refers to them.
    for line in _sizing_section().splitlines()[1:]:
        if line.startswith("|"):
            continue
        bare = " ".join(w for w in INLINE.sub("", line).split() if "/" not in w)
        assert not re.search(r"\d", bare), f"section 8 prose quotes a figure: {line}"


@pytest.mark.parametrize("figure", FIGURES, ids=str)
def test_sizing_figure_matches_the_benchmark_json(figure: Figure) -> None:
    data = json.loads((RESULTS / figure.source).read_text())
    actual = _value(data, figure.key)
    if figure.shown.startswith("`"):
        assert figure.shown.strip("`") == actual, f"{figure}: the JSON says {actual!r}"
    else:
        assert _agrees(figure.shown, figure.percent, actual), (
            f"docs/operations.md section 8, '{figure.row}': {figure}, but the JSON says "
            f"{actual!r}; update the figure from the JSON")
