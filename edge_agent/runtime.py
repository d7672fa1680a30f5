"""Model runtimes on the device: onnxruntime and LiteRT behind one small interface.

A ``Session`` runs a converted model (see ``converter.reference`` for the canonical
inputs and outputs) on a float32 batch and returns its outputs by name. Runtime
errors are translated into ``RuntimeLoadError`` and ``InferenceError`` here.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_agent.errors import InferenceError, RuntimeLoadError

RUNTIMES = ("onnxruntime", "tflite")


class Session(Protocol):
    input_name: str
    n_features: int | None
    output_names: list[str]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]: ...


def runtime_for(path: Path) -> str:
    return "tflite" if path.suffix == ".tflite" else "onnxruntime"


def load_session(path: Path, runtime: str | None = None, *, threads: int = 1) -> Session:
    """Load ``path`` with ``runtime`` (from the file suffix when None)."""
    runtime = runtime or runtime_for(path)
    if runtime == "onnxruntime":
        return OnnxSession(path, threads=threads)
    if runtime == "tflite":
        return TfliteSession(path, threads=threads)
    raise RuntimeLoadError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")


class OnnxSession:
    def __init__(self, path: Path, *, threads: int = 1) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise RuntimeLoadError(
                "onnxruntime is not installed: pip install 'lineside[agent]'"
            ) from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped exceptions
            raise RuntimeLoadError(f"onnxruntime cannot load {path.name}: {exc}") from exc
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            raise RuntimeLoadError(f"{path.name} has {len(inputs)} inputs; lineside feeds one")
        self.input_name: str = inputs[0].name
        shape = inputs[0].shape
        last = shape[-1] if shape else None
        self.n_features: int | None = last if isinstance(last, int) else None
        self.output_names: list[str] = [o.name for o in self._session.get_outputs()]

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(None, {self.input_name: x})
        except Exception as exc:
            raise InferenceError(f"onnxruntime failed: {exc}") from exc
        return dict(zip(self.output_names, values, strict=True))


def _tflite_interpreter_class() -> Any:
    # Only ai-edge-litert: tflite-runtime 2.14 (2023) fails under numpy 2 and rejects current
    # TensorFlow's op versions (docs/adr/0003-tflite-runtime.md).
    try:
        return importlib.import_module("ai_edge_litert.interpreter").Interpreter
    except ImportError:
        raise RuntimeLoadError(
            "no TFLite runtime installed: pip install 'lineside[agent-tflite]' (ai-edge-litert)"
        ) from None


class TfliteSession:
    def __init__(self, path: Path, *, threads: int = 1) -> None:
        interpreter_class = _tflite_interpreter_class()
        try:
            self._interpreter = interpreter_class(model_path=str(path), num_threads=threads)
            self._runner = self._interpreter.get_signature_runner()
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError with text only
            raise RuntimeLoadError(f"LiteRT cannot load {path.name}: {exc}") from exc
        details = self._runner.get_input_details()
        if len(details) != 1:
            raise RuntimeLoadError(f"{path.name} has {len(details)} inputs; lineside feeds one")
        self.input_name = next(iter(details))
        shape = details[self.input_name]["shape_signature"]
        self.n_features = int(shape[-1]) if len(shape) and shape[-1] > 0 else None
        self.output_names = sorted(self._runner.get_output_details())

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        try:
            out = self._runner(**{self.input_name: x})
        except Exception as exc:
            raise InferenceError(f"LiteRT failed: {exc}") from exc
        return {name: np.asarray(value) for name, value in out.items()}
