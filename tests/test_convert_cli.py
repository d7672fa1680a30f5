"""`lineside convert` end to end: bundles, registry logging, and one clear line per error."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from converter.cli import convert as convert_cmd
from tests.support.broker import free_port
from tests.support.registry import Registry

NAME = "cli-model"
FEATURES = ["vibration", "temp", "current", "cycle"]


@pytest.fixture(scope="module")
def registered(registry: Registry) -> Any:
    rng = np.random.default_rng(7)
    X = pd.DataFrame(rng.normal(size=(300, 4)), columns=FEATURES)
    y = (X["vibration"] - X["current"] > 0).astype(int).to_numpy()
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(X, y)
    info = registry.log_sklearn(model, X, name="model", registered_name=NAME)
    registry.set_alias(NAME, "production", 1)
    return info


def _run(*args: str) -> Any:
    return CliRunner().invoke(convert_cmd, list(args), catch_exceptions=False)


def test_convert_writes_a_valid_mlflow_bundle_with_metadata(
    registered: Any, tmp_path: Path
) -> None:
    result = _run(
        f"models:/{NAME}@production", "--out", str(tmp_path), "--variant", "onnx-fp32", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["variants"][0]["status"] == "written"
    bundle = tmp_path / "onnx-fp32"

    import mlflow.pyfunc
    from mlflow.models import Model

    meta = (Model.load(str(bundle)).metadata or {})["lineside"]
    # every file's digest is right, and nothing pickled is in the bundle
    for rel, digest in meta["files"].items():
        data = (bundle / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest["sha256"]
        assert len(data) == digest["size"]
    suffixes = {p.suffix for p in bundle.rglob("*")}
    assert not suffixes & {".pkl", ".pickle", ".skops", ".joblib", ".cloudpickle"}
    # what loading the bundle needs, and nothing of the source model's stack
    requirements = {
        line.split("==")[0].split("<")[0].split(">")[0]
        for line in (bundle / "requirements.txt").read_text().split()
    }
    assert {"onnx", "onnxruntime"} <= requirements
    assert not requirements & {"scikit-learn", "tensorflow", "skl2onnx", "skops", "cloudpickle"}
    assert meta["feature_names"] == FEATURES
    assert [c["name"] for c in meta["input_signature"]["inputs"]] == FEATURES
    assert meta["source"]["registered_name"] == NAME and meta["source"]["selector"] == "@production"
    assert meta["classes"] == [0, 1]
    assert meta["parity"]["passed"] is True
    assert {f["name"] for f in meta["baseline"]["features"]} == set(FEATURES)
    assert all(len(f["edges"]) == len(f["fractions"]) + 1 for f in meta["baseline"]["features"])
    assert "mlflow" in meta["tools"] and "onnxruntime" in meta["tools"]

    # golden pairs reproduce on bare onnxruntime, and MLflow's pyfunc loads the bundle
    from edge_agent.runtime import load_session

    session = load_session(bundle / "model.onnx")
    golden = meta["golden"]
    out = session.run(np.asarray(golden["inputs"], dtype=np.float32))
    np.testing.assert_allclose(out["probabilities"], golden["outputs"]["probabilities"], atol=1e-6)
    pyfunc = mlflow.pyfunc.load_model(str(bundle))
    predicted = pyfunc.predict(np.asarray(golden["inputs"], dtype=np.float32))
    assert list(predicted["label"]) == golden["outputs"]["label"]


def test_log_to_registry_puts_bundles_on_the_run_and_tags_the_version(
    registered: Any, registry: Registry, tmp_path: Path
) -> None:
    result = _run(
        f"models:/{NAME}/1", "--out", str(tmp_path), "--variant", "onnx-fp32", "--log-to-registry"
    )
    assert result.exit_code == 0, result.output
    client = registry.client()
    listed = [a.path for a in client.list_artifacts(registered.run_id, "lineside/onnx-fp32")]
    assert "lineside/onnx-fp32/model.onnx" in listed
    assert "lineside/onnx-fp32/MLmodel" in listed
    tags = client.get_model_version(NAME, "1").tags
    assert tags["lineside.variants"] == "onnx-fp32"
    assert tags["lineside.onnx-fp32.parity"].startswith("pass label_agreement=100.0000%")
    assert (
        int(tags["lineside.onnx-fp32.size_bytes"])
        == (tmp_path / "onnx-fp32" / "model.onnx").stat().st_size
    )


def test_a_failed_parity_gate_exits_non_zero_and_writes_nothing(
    registered: Any, tmp_path: Path
) -> None:
    # Agreement above 100% cannot be met: the gate must refuse, whatever the model.
    result = _run(
        f"models:/{NAME}/1",
        "--out",
        str(tmp_path),
        "--variant",
        "onnx-fp32",
        "--min-agreement-fp32",
        "1.01",
    )
    assert result.exit_code == 1
    assert "parity gate failed" in result.output
    assert not (tmp_path / "onnx-fp32").exists()
    assert list(tmp_path.iterdir()) == []


def test_min_agreement_reduced_sets_the_gate_of_fp16_and_int8(
    registry: Registry, model_name: str, tmp_path: Path
) -> None:
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(11)
    X = pd.DataFrame(rng.normal(size=(400, 4)), columns=FEATURES)
    y = (X["vibration"] * X["temp"] > 0).astype(int).to_numpy()
    # (64, 64) hidden units: enough weights that fp16 halves the file, so the variant applies
    model = MLPClassifier(hidden_layer_sizes=(64, 64), max_iter=300, random_state=0).fit(X, y)
    registry.log_sklearn(model, X, name="model", registered_name=model_name)
    uri = f"models:/{model_name}/1"
    ok = _run(uri, "--out", str(tmp_path / "ok"), "--variant", "onnx-fp16", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["variants"][0]["status"] == "written"
    # Agreement above 100% cannot be met: the reduced-precision gate must refuse it.
    strict = _run(uri, "--out", str(tmp_path / "strict"), "--variant", "onnx-fp16",
                  "--min-agreement-reduced", "1.01")
    assert strict.exit_code == 1
    assert "parity gate failed" in strict.output
    assert not (tmp_path / "strict" / "onnx-fp16").exists()


def test_target_builds_the_variants_the_device_class_prefers(
    registered: Any, tmp_path: Path
) -> None:
    shipped = Path(__file__).resolve().parents[1] / "device_configs" / "raspberry-pi-4.toml"
    text = shipped.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("variants = ["))
    # The shipped class, preferring onnx-int8 then onnx-fp32 (no TFLite build in this test).
    config = tmp_path / "pi4.toml"
    config.write_text(text.replace(line, 'variants = ["onnx-int8", "onnx-fp32"]'))
    result = _run(f"models:/{NAME}/1", "--out", str(tmp_path / "out"), "--target", str(config),
                  "--json")
    assert result.exit_code == 0, result.output
    report = {v["variant"]: v for v in json.loads(result.stdout)["variants"]}
    assert list(report) == ["onnx-int8", "onnx-fp32"]
    # LogisticRegression is an ai.onnx.ml LinearClassifier: nothing for int8 to quantize
    assert report["onnx-int8"]["status"] == "skipped" and "int8" in report["onnx-int8"]["reason"]
    assert report["onnx-fp32"]["status"] == "written"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["onnx-fp32"]

    broken = tmp_path / "broken.toml"
    broken.write_text(text.replace(line, 'variants = "onnx-fp32"'))
    bad = _run(f"models:/{NAME}/1", "--out", str(tmp_path / "bad"), "--target", str(broken))
    assert bad.exit_code == 2
    assert f"--target {broken}" in bad.stderr and "variants" in bad.stderr


def test_calibration_csv_feeds_the_gate_and_the_baseline(registered: Any, tmp_path: Path) -> None:
    rows = np.random.default_rng(3).normal(size=(64, 4))
    csv = tmp_path / "cal.csv"
    pd.DataFrame(rows, columns=FEATURES).to_csv(csv, index=False)
    result = _run(
        f"models:/{NAME}/1",
        "--out",
        str(tmp_path / "out"),
        "--variant",
        "onnx-fp32",
        "--calibration-data",
        str(csv),
        "--json",
    )
    assert result.exit_code == 0, result.output
    parity = json.loads(result.stdout)["variants"][0]["parity"]
    assert parity["rows_validation"] == 64
    from mlflow.models import Model

    meta = (Model.load(str(tmp_path / "out" / "onnx-fp32")).metadata or {})["lineside"]
    assert meta["baseline"]["source"] == "calibration-data"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["models:/cli-model@nope"], "nope"),
        (["models:/ghost-model/1"], "ghost-model"),
        (["models:/cli-model/1", "--calibration-data", "/no/such.csv"], "no such file"),
        (["models:/cli-model/1", "--calibration-data", "BADCSV"], "lacks column"),
    ],
)
def test_errors_are_one_line_and_exit_2(
    registered: Any, tmp_path: Path, args: list[str], needle: str
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    args = [str(bad) if a == "BADCSV" else a for a in args]
    result = _run(*args, "--out", str(tmp_path / "out"), "--variant", "onnx-fp32")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lineside convert: error:")
    assert needle in lines[0]
    assert "Traceback" not in result.output


def test_unreachable_tracking_server_is_one_line(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    result = _run("models:/x/1", "--out", str(tmp_path), "--tracking-uri", uri)
    assert result.exit_code == 2
    assert "unreachable" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_no_signature_and_no_input_example_is_refused(
    registry: Registry, model_name: str, tmp_path: Path
) -> None:
    import mlflow
    import mlflow.onnx
    from skl2onnx import to_onnx

    # An ONNX model logged bare: no signature, no example, no n_features_in_.
    X = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    proto = to_onnx(
        LogisticRegression().fit(X, X[:, 0] > 0), X[:1], options={"zipmap": False}, target_opset=17
    )
    with mlflow.start_run():
        mlflow.onnx.log_model(
            proto, name="m", registered_model_name=model_name, pip_requirements=["onnxruntime"]
        )
    result = _run(f"models:/{model_name}/1", "--out", str(tmp_path), "--variant", "onnx-fp32")
    assert result.exit_code == 2
    assert "no signature and no input example" in result.stderr


def test_string_inputs_are_refused_with_the_column_named(
    registry: Registry, model_name: str, tmp_path: Path
) -> None:
    import mlflow
    import mlflow.sklearn
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    X = np.random.default_rng(0).normal(size=(50, 2))
    model = LogisticRegression().fit(X, X[:, 0] > 0)
    signature = ModelSignature(inputs=Schema([ColSpec("double", "a"), ColSpec("string", "line")]))
    with mlflow.start_run():
        mlflow.sklearn.log_model(
            model,
            name="m",
            registered_model_name=model_name,
            signature=signature,
            serialization_format="cloudpickle",
            pip_requirements=["scikit-learn", "cloudpickle"],
        )
    result = _run(f"models:/{model_name}/1", "--out", str(tmp_path), "--variant", "onnx-fp32")
    assert result.exit_code == 2
    assert "line (string)" in result.stderr and "not numeric" in result.stderr


def test_the_lineside_command_runs_convert_in_a_subprocess(
    registered: Any, registry: Registry, tmp_path: Path
) -> None:
    env = dict(os.environ, MLFLOW_TRACKING_URI=registry.tracking_uri)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lineside.cli",
            "convert",
            f"models:/{NAME}@production",
            "--out",
            str(tmp_path),
            "--variant",
            "onnx-fp32",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["variants"][0]["status"] == "written"


def test_unsupported_estimator_is_named_with_a_pointer_to_capabilities(
    registry: Registry, model_name: str, tmp_path: Path
) -> None:
    from sklearn.neighbors import KNeighborsClassifier

    X = pd.DataFrame(np.random.default_rng(0).normal(size=(60, 3)), columns=["a", "b", "c"])
    model = KNeighborsClassifier().fit(X, (X["a"] > 0).astype(int))
    registry.log_sklearn(model, X, name="m", registered_name=model_name)
    result = _run(f"models:/{model_name}/1", "--out", str(tmp_path), "--variant", "onnx-fp32")
    assert result.exit_code != 0
    message = (result.stderr + result.stdout).strip().splitlines()
    text = " ".join(message)
    assert "KNeighborsClassifier" in text and "--capabilities" in text
    assert "Traceback" not in result.output
    assert not (tmp_path / "onnx-fp32").exists()


def test_debug_shows_the_traceback(registered: Any, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        convert_cmd, ["models:/ghost-model/1", "--out", str(tmp_path), "--debug"]
    )
    assert result.exit_code != 0
    assert result.exc_info is not None
    from converter.errors import ModelNotFoundError

    assert isinstance(result.exception, ModelNotFoundError)


# ---- `lineside convert --capabilities`: the matrix README shows, from the real command ----

README = Path(__file__).resolve().parents[1] / "README.md"


def _lineside(*args: str) -> Any:
    from lineside.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _readme_matrix() -> str:
    """The table under README's "What converts to what" heading, verbatim."""
    section = README.read_text().split("## What converts to what", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows, "README's 'What converts to what' section has no table"
    return "\n".join(rows)


def test_capabilities_text_runs_and_explains_every_no() -> None:
    from converter.capabilities import estimators

    result = _lineside("convert", "--capabilities")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = lines[0].split()
    assert header == ["onnx-fp32", "onnx-fp16", "onnx-int8", "tflite-fp32", "tflite-fp16",
                      "tflite-int8"]
    rows = {line.split()[0]: line for line in lines[1:] if line and line.split()[0] in
            estimators()}
    assert list(rows) == list(estimators())
    # IsolationForest has no TFLite op; every "no [n]" has its footnote [n] below the table.
    assert "no [" in rows["IsolationForest"] and rows["MLPClassifier"].count("yes") == 6
    cited = {int(n) for n in re.findall(r"no \[(\d+)\]", result.stdout)}
    notes = {int(m) for m in re.findall(r"^\[(\d+)\] \S", result.stdout, re.M)}
    assert cited and cited == notes


def test_capabilities_markdown_is_readme_table_verbatim() -> None:
    result = _lineside("convert", "--capabilities", "--format", "markdown")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == _readme_matrix(), (
        "README's matrix differs from `lineside convert --capabilities --format markdown`; "
        "paste the command's output into README.md"
    )


def test_capabilities_json_matches_the_format_flag_and_the_table() -> None:
    from converter.capabilities import matrix

    as_flag = _lineside("convert", "--capabilities", "--json")
    as_format = _lineside("convert", "--capabilities", "--format", "json")
    assert as_flag.exit_code == 0 and as_format.exit_code == 0
    assert json.loads(as_flag.stdout) == json.loads(as_format.stdout) == matrix()
    assert json.loads(as_flag.stdout)["KMeans"]["tflite-int8"] is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "markdown"], "--format applies to --capabilities only"),
        (["--capabilities", "--json", "--format", "markdown"], "--json contradicts --format"),
        (["--capabilities", "--format", "html"], "'html' is not one of"),
    ],
)
def test_capabilities_format_misuse_is_a_usage_error(args: list[str], message: str) -> None:
    result = CliRunner().invoke(convert_cmd, args)
    assert result.exit_code == 2
    assert message in result.output
