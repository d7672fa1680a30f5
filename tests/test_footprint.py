"""`lineside` on a gateway: with only the agent extra's packages importable, the CLI and
the agent work, and server-side commands say which extra they need in one line."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# A process in which the server-side packages cannot be imported, as in an install
# with only `lineside[agent]` (numpy, paho-mqtt, click, onnxruntime).
_BLOCKED = textwrap.dedent(
    """
    import sys
    BLOCKED = ("mlflow", "onnx", "skl2onnx", "sklearn", "pandas", "tensorflow", "keras",
               "cryptography", "yaml", "rich", "psutil", "skops")

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    from lineside.cli import cli
    sys.argv = ["lineside", *sys.argv[1:]]
    try:
        cli(prog_name="lineside")
    finally:
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not leaked, leaked
    """
)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKED, *args],
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_help_and_agent_commands_need_no_server_packages() -> None:
    for args in (["--help"], ["agent", "--help"], ["agent", "run", "--help"],
                 ["agent", "predict", "--help"], ["agent", "status", "--help"]):
        proc = _run(*args)
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
        assert "Usage" in proc.stdout


def test_server_commands_name_the_missing_extra_in_one_line() -> None:
    proc = _run("convert", "--capabilities")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "lineside[server]" in lines[0]
