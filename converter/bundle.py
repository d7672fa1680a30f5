"""Write one variant as an MLflow model directory, atomically.

Layout of ``DIR/<variant>/``: the model file (``model.onnx`` or ``model.tflite``),
``MLmodel`` (flavors, signature, and lineside's metadata under ``metadata.lineside``),
``input_example.json`` and MLflow's environment files. Nothing pickled. Everything is
written into a temporary sibling directory, fsynced, and renamed into place, so a
failure leaves either the previous bundle or none — never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from converter.errors import ConversionFailed

MODEL_FILES = {"onnxruntime": "model.onnx", "tflite": "model.tflite"}


def write_bundle(
    out_dir: Path,
    variant: str,
    model_bytes: bytes,
    *,
    runtime: str,
    signature: Any,
    input_example: Any,
    metadata: dict[str, Any],
) -> Path:
    """Write the bundle and return its final path; ``metadata`` gains ``files``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / variant
    staging = out_dir / f".{variant}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        if runtime == "onnxruntime":
            _save_onnx(staging, model_bytes, signature, input_example)
        else:
            _save_tflite(staging, model_bytes, signature, input_example)
        metadata["files"] = file_digests(staging)
        _set_metadata(staging, metadata)
        _fsync_tree(staging)
        _replace_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _save_onnx(path: Path, model_bytes: bytes, signature: Any, example: Any) -> None:
    import mlflow.onnx
    import onnx

    try:
        mlflow.onnx.save_model(
            onnx.load_from_string(model_bytes),
            str(path),
            signature=signature,
            input_example=example,
            # External data files would let a bundle point outside itself; never.
            save_as_external_data=False,
            # What loading an ONNX bundle needs, stated: MLflow would otherwise start a
            # subprocess per bundle (~2 s) that loads it to see what it imports, and finds
            # the same (plus numpy, which onnxruntime brings anyway).
            pip_requirements=mlflow.onnx.get_default_pip_requirements(),
        )
    except Exception as exc:
        raise ConversionFailed(f"MLflow could not save the ONNX bundle: {exc}") from exc


def _save_tflite(path: Path, model_bytes: bytes, signature: Any, example: Any) -> None:
    import mlflow.pyfunc
    from mlflow.models import Model
    from mlflow.models.utils import _save_example

    path.mkdir(parents=True)
    (path / MODEL_FILES["tflite"]).write_bytes(model_bytes)
    model = Model(signature=signature)
    model.add_flavor("tflite", data=MODEL_FILES["tflite"], runtime="ai-edge-litert")
    mlflow.pyfunc.add_to_model(
        model, loader_module="converter.tflite_pyfunc", data=MODEL_FILES["tflite"]
    )
    if example is not None:
        _save_example(model, example, str(path))
    model.save(str(path / "MLmodel"))
    (path / "requirements.txt").write_text("lineside[agent-tflite]\nnumpy\npandas\n")


def _set_metadata(path: Path, metadata: dict[str, Any]) -> None:
    from mlflow.models import Model

    model = Model.load(str(path))
    model.metadata = {"lineside": _jsonable(metadata)}
    model.save(str(path / "MLmodel"))


def file_digests(path: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file except MLmodel (which carries these digests)."""
    digests: dict[str, dict[str, Any]] = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if rel == "MLmodel":
            continue
        data = file.read_bytes()
        digests[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    return digests


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(staging: Path, final: Path) -> None:
    # A directory cannot be renamed over a non-empty one: move the old aside first, so
    # at every instant `final` is either the complete old or the complete new bundle.
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    staging.rename(final)
    _fsync_dir(final.parent)
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    return value
