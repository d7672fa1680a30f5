"""scikit-learn model -> the canonical ONNX graph of ``docs/internals.md``.

skl2onnx does the heavy lifting; this module fixes what lineside's contract needs and
skl2onnx does not give: one input ``X`` float32 ``[N, F]``, outputs named and shaped as
``converter.reference.output_specs`` says (``label`` is the class *index*), no duplicate
``opset_import`` entries (they break ``quantize_dynamic``) and opsets
``{'': 21, 'ai.onnx.ml': 3}``. IsolationForest goes through lineside's own converter
(``converter.isolation_forest``): skl2onnx's graph is ~2,700 nodes and ~1 ms per row.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from skl2onnx.common.exceptions import MissingConverter, MissingShapeCalculator

from converter.errors import (
    ConversionFailed,
    InputSpecError,
    ModelLoadError,
    UnsupportedModelError,
)
from converter.reference import OutputSpec, final_estimator, output_specs, task_of

INPUT_NAME = "X"
ML_DOMAIN = "ai.onnx.ml"
# The contract's opsets; ai.onnx.ml 4 is not accepted by skl2onnx's IsolationForest.
TARGET_OPSET: dict[str, int] = {"": 21, ML_DOMAIN: 3}

# Final estimators lineside converts and tests (tests/test_onnx_build.py), by class name.
SUPPORTED_ESTIMATORS: frozenset[str] = frozenset(
    {
        "IsolationForest",
        "OneClassSVM",
        "LocalOutlierFactor",
        "RandomForestClassifier",
        "RandomForestRegressor",
        "ExtraTreesClassifier",
        "ExtraTreesRegressor",
        "GradientBoostingClassifier",
        "GradientBoostingRegressor",
        "HistGradientBoostingClassifier",
        "HistGradientBoostingRegressor",
        "LogisticRegression",
        "LinearRegression",
        "Ridge",
        "Lasso",
        "ElasticNet",
        "SVC",
        "SVR",
        "MLPClassifier",
        "MLPRegressor",
        "KMeans",
    }
)

# Preprocessing steps converted in front of any final estimator (tests/test_onnx_build.py).
SUPPORTED_PREPROCESSING: frozenset[str] = frozenset(
    {"StandardScaler", "MinMaxScaler", "RobustScaler", "PCA"}
)

ONNX_VARIANTS = ("onnx-fp32", "onnx-fp16", "onnx-int8")

# Why a variant does not apply, as observed with skl2onnx 1.20 / onnxruntime 1.32 on these
# estimators behind a scaler (tests/test_onnx_variants.py checks every "no" against the
# real to_fp16/to_int8). MLP, KMeans and LocalOutlierFactor are supported by both, but
# to_fp16/to_int8 still skip a model too small to shrink (scales and Casts outweigh it).
_FP16_NO = (
    "fp16: the model is an ai.onnx.ml {op} whose weights/thresholds are float attributes; "
    "onnxruntime has no float16 kernel for it, so no parameter would shrink"
)
_INT8_NO = (
    "int8: onnxruntime quantizes MatMul/Conv/Gather (dynamic) and MatMul/Gemm/Conv/Gather "
    "(static QDQ); a {op} has none, so nothing would be quantized"
)
_ML_OP_OF: dict[str, str] = {
    "IsolationForest": "TreeEnsembleRegressor",
    "RandomForestClassifier": "TreeEnsembleClassifier",
    "ExtraTreesClassifier": "TreeEnsembleClassifier",
    "GradientBoostingClassifier": "TreeEnsembleClassifier",
    "HistGradientBoostingClassifier": "TreeEnsembleClassifier",
    "RandomForestRegressor": "TreeEnsembleRegressor",
    "ExtraTreesRegressor": "TreeEnsembleRegressor",
    "GradientBoostingRegressor": "TreeEnsembleRegressor",
    "HistGradientBoostingRegressor": "TreeEnsembleRegressor",
    "LogisticRegression": "LinearClassifier",
    "LinearRegression": "LinearRegressor",
    "Ridge": "LinearRegressor",
    "Lasso": "LinearRegressor",
    "ElasticNet": "LinearRegressor",
    "SVC": "SVMClassifier",
    "SVR": "SVMRegressor",
    "OneClassSVM": "SVMRegressor",
}


def sklearn_to_onnx(model: Any, n_features: int) -> onnx.ModelProto:
    """The canonical ONNX graph of a fitted estimator or Pipeline with ``n_features`` inputs."""
    check_n_features(model, n_features)
    estimator = final_estimator(model)
    name = type(estimator).__name__
    if name not in SUPPORTED_ESTIMATORS:
        raise UnsupportedModelError(f"{name} is not in lineside's ONNX coverage")
    if name == "IsolationForest":
        # Imported here: converter.isolation_forest builds on this module's helpers.
        from converter.isolation_forest import isolation_forest_to_onnx

        return isolation_forest_to_onnx(model, n_features)
    specs = _output_specs(model)
    onx = skl2onnx_convert(_with_index_labels(model), n_features)
    return finalize(_canonical_outputs(onx, estimator, specs))


def unsupported_reason(estimator_class_name: str, variant: str) -> str | None:
    """Why ``variant`` cannot be built for ``estimator_class_name``; None when it can.

    For MLP, KMeans and LocalOutlierFactor None means "converts"; to_fp16/to_int8 still
    skip a model too small to shrink, and dynamic int8 skips KMeans (no Gemm kernel).
    """
    if variant not in ONNX_VARIANTS:
        return f"{variant} is not an ONNX variant ({', '.join(ONNX_VARIANTS)})"
    if estimator_class_name in SUPPORTED_PREPROCESSING:
        # A preprocessing step never decides a variant: the final estimator does. (Scalers
        # are ai.onnx.ml Scaler ops and stay fp32 inside fp16/int8 graphs; PCA's MatMul
        # is converted/quantized with the rest.)
        return None
    if estimator_class_name not in SUPPORTED_ESTIMATORS:
        return f"{estimator_class_name} is not in lineside's ONNX coverage"
    op = _ML_OP_OF.get(estimator_class_name)
    if op is None or variant == "onnx-fp32":
        return None
    return (_FP16_NO if variant == "onnx-fp16" else _INT8_NO).format(op=op)


def onnx_source_model(model_proto: onnx.ModelProto) -> onnx.ModelProto:
    """Validate a model from MLflow's onnx flavor and pass it through with input ``X``.

    The contract needs one float32 ``[N, F]`` input and no external data (a bundle is one
    file); outputs are the author's and are checked by the parity gate, not here.
    """
    if not isinstance(model_proto, onnx.ModelProto) or not model_proto.HasField("graph"):
        raise ModelLoadError("not an ONNX ModelProto with a graph")
    if _uses_external_data(model_proto.graph):
        raise UnsupportedModelError("the ONNX model keeps tensors in external data files")
    inputs = graph_inputs(model_proto.graph)
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise UnsupportedModelError(f"lineside feeds one input; the model has {names}")
    tensor_type = inputs[0].type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT:
        found = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        raise UnsupportedModelError(f"input {inputs[0].name} is {found}; lineside feeds float32")
    if tensor_type.HasField("shape") and len(tensor_type.shape.dim) != 2:
        raise UnsupportedModelError(f"input {inputs[0].name} is not [N, F]")
    model = copy.deepcopy(model_proto)
    if inputs[0].name != INPUT_NAME:
        if INPUT_NAME in _tensor_names(model.graph):
            raise UnsupportedModelError(f"cannot rename the input: {INPUT_NAME!r} is taken")
        rename_tensor(model.graph, inputs[0].name, INPUT_NAME)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelLoadError(f"invalid ONNX model: {exc}") from exc
    return dedupe_opsets(model)


# --- helpers shared with converter.isolation_forest -----------------------------------


def split_pipeline(model: Any) -> tuple[list[tuple[str, Any]], Any]:
    """(preprocessing steps, final estimator), nested Pipelines flattened."""
    steps = getattr(model, "steps", None)
    if not steps:
        return [], model
    pre: list[tuple[str, Any]] = []
    for step_name, step in steps[:-1]:
        if step is None or step == "passthrough":
            continue
        inner, last = split_pipeline(step)
        pre.extend(inner)
        pre.append((step_name, last))
    inner, last = split_pipeline(steps[-1][1])
    return pre + inner, last


def skl2onnx_convert(
    model: Any, n_features: int, options: dict[Any, Any] | None = None
) -> onnx.ModelProto:
    """skl2onnx with lineside's input and opsets; its errors translated."""
    estimator = final_estimator(model)
    if options is None and _is_classifier(model):
        options = {id(estimator): {"zipmap": False}}
    try:
        converted: onnx.ModelProto = convert_sklearn(
            model,
            initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))],
            target_opset=TARGET_OPSET,
            options=options,
        )
        return converted
    except (MissingConverter, MissingShapeCalculator) as exc:
        raise UnsupportedModelError(f"skl2onnx cannot convert {type(model).__name__}") from exc
    except Exception as exc:  # skl2onnx raises RuntimeError/ValueError/TypeError freely
        raise ConversionFailed(f"skl2onnx failed on {type(model).__name__}: {exc}") from exc


def dedupe_opsets(model: onnx.ModelProto) -> onnx.ModelProto:
    """One opset_import per domain, the highest version listed (duplicates break
    ``quantize_dynamic``)."""
    versions: dict[str, int] = {}
    for entry in model.opset_import:
        versions[entry.domain] = max(versions.get(entry.domain, 0), entry.version)
    _set_opsets(model, versions)
    return model


def finalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Contract opsets, producer stamp and a full check (shape inference included).

    skl2onnx emits every op at its newest schema <= the target opset and then declares the
    smallest opset covering them (9, 13, 18...), so declaring the target itself changes no
    op's meaning. The ai.onnx.ml ops it emits have the same schema at ml opset 1 and 3.
    The checker below would reject an op whose schema differs at the declared version.
    """
    dedupe_opsets(model)
    versions = {entry.domain: entry.version for entry in model.opset_import}
    versions.update(TARGET_OPSET)
    _set_opsets(model, versions)
    model.producer_name = "lineside"
    # Declaring opset 21 needs IR 10; skl2onnx stamped the IR of the smaller opset.
    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(model.opset_import))
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ConversionFailed(f"the converted graph is invalid: {exc}") from exc
    return model


def _set_opsets(model: onnx.ModelProto, versions: dict[str, int]) -> None:
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in sorted(versions.items()))


def graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    """Real inputs: old IR versions also list initializers as inputs."""
    initializers = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in initializers]


def rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a tensor everywhere in ``graph`` (subgraphs included: LOF has a Scan body)."""
    for node in graph.node:
        _replace(node.input, old, new)
        _replace(node.output, old, new)
        for attribute in node.attribute:
            for sub in _subgraphs(attribute):
                rename_tensor(sub, old, new)
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name == old:
            value.name = new
    for tensor in graph.initializer:
        if tensor.name == old:
            tensor.name = new


# --- output canonicalisation ------------------------------------------------------------


def _output_specs(model: Any) -> list[OutputSpec]:
    try:
        return output_specs(model)
    except (ValueError, AttributeError) as exc:
        raise UnsupportedModelError(f"cannot tell the outputs of {type(model).__name__}") from exc


def _is_classifier(model: Any) -> bool:
    try:
        return task_of(model) == "classifier"
    except ValueError:
        return False


def check_n_features(model: Any, n_features: int) -> None:
    """InputSpecError when the model was fitted on another number of features."""
    expected = getattr(model, "n_features_in_", None)
    if expected is not None and int(expected) != n_features:
        raise InputSpecError(f"the model was fitted on {expected} features, not {n_features}")


def _with_index_labels(model: Any) -> Any:
    """A copy whose classifier has classes 0..C-1, so skl2onnx's ``label`` is the index."""
    if not _is_classifier(model):
        return model
    indexed = copy.deepcopy(model)
    estimator = final_estimator(indexed)
    n_classes = len(estimator.classes_)
    try:
        estimator.classes_ = np.arange(n_classes, dtype=np.int64)
    except AttributeError as exc:  # a read-only property: no way to relabel
        raise UnsupportedModelError(f"cannot relabel {type(estimator).__name__}") from exc
    return indexed


def _canonical_outputs(
    onx: onnx.ModelProto, estimator: Any, specs: list[OutputSpec]
) -> onnx.ModelProto:
    """Map skl2onnx's outputs (same order as the specs) onto the contract's names/shapes."""
    graph = onx.graph
    produced = [o.name for o in graph.output]
    if len(produced) != len(specs):
        raise ConversionFailed(f"skl2onnx produced outputs {produced}, expected {len(specs)}")
    del graph.output[:]
    for source, spec in zip(produced, specs, strict=True):
        internal = f"skl2onnx_{source}"
        rename_tensor(graph, source, internal)
        column = _binary_score_column(estimator, spec)
        graph.node.extend(_reshape_nodes(graph, internal, spec, column))
        graph.output.append(_value_info(spec))
    return onx


def _binary_score_column(estimator: Any, spec: OutputSpec) -> int | None:
    """skl2onnx gives binary SVC scores as [N, 2] = [d, -d]; the contract wants d, [N]."""
    if spec.name != "scores" or spec.shape != (-1,):
        return None
    if type(estimator).__name__ == "SVC":
        return 0
    raise UnsupportedModelError(f"binary decision scores of {type(estimator).__name__}")


def _reshape_nodes(
    graph: onnx.GraphProto, source: str, spec: OutputSpec, column: int | None
) -> list[onnx.NodeProto]:
    nodes: list[onnx.NodeProto] = []
    current = source
    if column is not None:
        index = f"lineside_{spec.name}_column"
        graph.initializer.append(numpy_helper.from_array(np.array(column, np.int64), index))
        nodes.append(
            helper.make_node("Gather", [current, index], [f"lineside_{spec.name}_col"], axis=1)
        )
        current = f"lineside_{spec.name}_col"
    shape = f"lineside_{spec.name}_shape"
    graph.initializer.append(numpy_helper.from_array(np.array(spec.shape, np.int64), shape))
    target_type = helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))
    nodes.append(helper.make_node("Reshape", [current, shape], [f"lineside_{spec.name}_reshaped"]))
    # Cast is a no-op when the type already fits; it pins the contract's dtype regardless.
    nodes.append(
        helper.make_node("Cast", [f"lineside_{spec.name}_reshaped"], [spec.name], to=target_type)
    )
    return nodes


def _value_info(spec: OutputSpec) -> onnx.ValueInfoProto:
    dims: list[int | str | None] = [None if d == -1 else d for d in spec.shape]
    elem_type = helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))
    return helper.make_tensor_value_info(spec.name, elem_type, dims)


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _replace(names: Any, old: str, new: str) -> None:
    for i, name in enumerate(names):
        if name == old:
            names[i] = new


def _subgraphs(attribute: onnx.AttributeProto) -> Iterable[onnx.GraphProto]:
    if attribute.type == onnx.AttributeProto.GRAPH:
        yield attribute.g
    elif attribute.type == onnx.AttributeProto.GRAPHS:
        yield from attribute.graphs


def _uses_external_data(graph: onnx.GraphProto) -> bool:
    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            return True
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and (
                attribute.t.data_location == onnx.TensorProto.EXTERNAL
            ):
                return True
            if any(_uses_external_data(sub) for sub in _subgraphs(attribute)):
                return True
    return False
