"""fp16 and int8 variants of a canonical fp32 ONNX graph.

Both keep the contract's float32 input ``X`` and float32/int64 outputs. A variant that
would change nothing (tree, linear-classifier and SVM ops are ``ai.onnx.ml`` ops with no
float16 or integer kernels) raises ``VariantNotApplicable``: lineside never ships an "int8"
file that is really fp32. Every result is loaded and run once in onnxruntime before it is
returned, because converters can emit graphs onnxruntime rejects (field notes section 2).
int8 results are compacted (``compact``: short internal names, shared zero points, no
metadata, float16 bias storage), since the quantizer's fixed overhead otherwise keeps a
10k-weight MLP above 0.30x of its fp32 size. Static int8 quantizes the activations too
(the inputs of MatMul/Gemm; their outputs stay float); when the quantizer cannot type them
the settings say ``weights-only (static)`` instead of claiming QUInt8 activations.
"""

from __future__ import annotations

import itertools
import string
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxconverter_common import float16 as occ_float16
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from converter.errors import CalibrationDataError, ConversionFailed, VariantNotApplicable
from converter.onnx_build import ML_DOMAIN, dedupe_opsets, graph_inputs

# fp16/int8 are worth a variant only when they shrink most of the float parameters...
MIN_FP16_SHARE = 0.5
MIN_INT8_SHARE = 0.5
# ...and int8 only when the file really shrinks (tiny models grow: scales, Q/DQ nodes).
MAX_INT8_SIZE_RATIO = 0.75
MAX_FP16_SIZE_RATIO = 0.85
# Weight-bearing ops only: QDQ on Reshape/Where/Add around the outputs costs accuracy and
# saves nothing. Gather quantizes embedded tables (LocalOutlierFactor's training set).
DYNAMIC_OPS = ("MatMul", "Conv", "Gather")
STATIC_OPS = ("MatMul", "Gemm", "Conv", "Gather")
SYMBOLIC_DUMP = "sym_shape_infer_temp.onnx"  # onnxruntime/tools/symbolic_shape_infer.py
CALIBRATION_BATCH = 64
# Static int8 is checked against fp32 on the calibration rows, twice as strict as the
# parity gate's 99% / 5e-2 (held-out rows fare worse than calibration rows).
INT8_SELF_CHECK = {"label_agreement": 0.995, "regression_rel_error": 0.025}
# int8 variants store bias vectors of at least this many floats as float16 (see compact).
FP16_BIAS_MIN = 32
# Ops whose presence means onnxruntime really quantized something.
_QUANTIZED_OPS = frozenset(
    {
        "MatMulInteger",
        "ConvInteger",
        "DynamicQuantizeLinear",
        "DynamicQuantizeMatMul",
        "QLinearMatMul",
        "QLinearConv",
        "QGemm",
        "QuantizeLinear",
        "DequantizeLinear",
    }
)
_INTEGER_TYPES = frozenset(
    {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
)


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """float16 weights and compute where onnxruntime has fp16 kernels; fp32 I/O kept."""
    share, blocked_ops = _fp16_share(model)
    if share < MIN_FP16_SHARE:
        ops = ", ".join(sorted(blocked_ops)) or "none"
        raise VariantNotApplicable(
            f"fp16: only {share:.0%} of the float parameters could become float16; the rest "
            f"are attributes of ai.onnx.ml ops ({ops}) that have no float16 kernels"
        )
    typed = _annotate_ml_types(model)
    errors: list[str] = []
    for name, convert in (
        ("onnxconverter_common", _fp16_onnxconverter_common),
        ("onnxruntime.transformers", _fp16_onnxruntime_transformers),
    ):
        try:
            candidate = _fp16_as_raw_data(dedupe_opsets(convert(typed)))
            _check_io_kept(model, candidate)
            smoke_test(candidate)
        except VariantNotApplicable:
            raise
        except (ConversionFailed, ValueError, RuntimeError, TypeError, KeyError) as exc:
            # onnxconverter_common's graphs for MLP/IsolationForest failed to load here.
            errors.append(f"{name}: {exc}")
            continue
        _check_smaller(model, candidate)
        return candidate
    raise ConversionFailed("fp16 conversion failed: " + "; ".join(errors))


def to_int8(
    model: onnx.ModelProto, calibration: np.ndarray | None
) -> tuple[onnx.ModelProto, dict[str, object]]:
    """Dynamic int8 (``calibration`` None) or static QDQ int8 calibrated on ``calibration``.

    Returns the model and the settings used, including which ops ended up quantized.
    VariantNotApplicable when onnxruntime quantizes nothing, when most float parameters
    sit in ai.onnx.ml attributes it cannot touch, or when the result is not smaller.
    """
    model = dedupe_opsets(_copy(model))
    share, blocked_ops = _fp16_share(model)
    if share < MIN_INT8_SHARE:
        raise VariantNotApplicable(
            f"int8: only {share:.0%} of the float parameters are initializers onnxruntime can "
            f"quantize; the rest are attributes of ai.onnx.ml ops "
            f"({', '.join(sorted(blocked_ops)) or 'none'})"
        )
    if calibration is not None:
        calibration = _check_calibration(model, calibration)
    quantized, settings = _int8_once(model, calibration, typed=True)
    if calibration is None or settings["mode"] != "static-qdq":
        return quantized, settings
    check, badness = _self_check(model, quantized, calibration)
    settings["self_check"] = check
    if badness <= 1.0:
        return quantized, settings
    # Quantized activations cost too much here (a 10k-weight MLPRegressor: 0.054 of its
    # prediction spread against the gate's 0.05). Untyped ai.onnx.ml outputs stop the
    # quantizer at the Scaler, which leaves int8 weights and float activations; ship that
    # when it is closer, labelled as what it is.
    fallback, fallback_settings = _int8_once(model, calibration, typed=False)
    if fallback_settings["mode"] != "weights-only (static)":
        return quantized, settings
    fallback_check, fallback_badness = _self_check(model, fallback, calibration)
    if fallback_badness >= badness:
        return quantized, settings
    fallback_settings["self_check"] = fallback_check
    fallback_settings["self_check_with_activations"] = check
    return fallback, fallback_settings


def _int8_once(
    model: onnx.ModelProto, calibration: np.ndarray | None, *, typed: bool
) -> tuple[onnx.ModelProto, dict[str, object]]:
    with tempfile.TemporaryDirectory(prefix="lineside-int8-") as tmp:
        source = Path(tmp) / "fp32.onnx"
        prepared = Path(tmp) / "prepared.onnx"
        target = Path(tmp) / "int8.onnx"
        # Typed ai.onnx.ml outputs (the Scaler in front of an MLP): without them the static
        # quantizer cannot type the activations downstream and quantizes weights only.
        onnx.save_model(_annotate_ml_types(model) if typed else model, source)
        pre_processing = _pre_process(model, source, prepared)
        quantizer_input = source if pre_processing == "none" else prepared
        settings = _quantize(quantizer_input, target, calibration)
        settings["pre_processing"] = pre_processing
        quantized = compact(onnx.load_model(target))
    _check_quantized(model, quantized, settings)
    smoke_test(quantized)
    return quantized, settings


def _self_check(
    original: onnx.ModelProto, quantized: onnx.ModelProto, rows: np.ndarray
) -> tuple[dict[str, float], float]:
    """Figures of ``quantized`` against ``original`` on ``rows``, and how far past
    INT8_SELF_CHECK they are (<= 1 passes)."""
    reference = _run_all(original, rows)
    outputs = _run_all(quantized, rows)
    figures: dict[str, float] = {"rows": float(len(rows))}
    badness = 0.0
    if "label" in reference:
        agreement = float(np.mean(outputs["label"] == reference["label"]))
        figures["label_agreement"] = round(agreement, 4)
        badness = max(badness, (1.0 - agreement) / (1.0 - INT8_SELF_CHECK["label_agreement"]))
    if "prediction" in reference:
        ref = reference["prediction"].astype(np.float64)
        error = float(np.max(np.abs(outputs["prediction"] - ref))) / max(float(ref.std()), 1e-12)
        figures["regression_rel_error"] = round(error, 5)
        badness = max(badness, error / INT8_SELF_CHECK["regression_rel_error"])
    return figures, badness


def _run_all(model: onnx.ModelProto, rows: np.ndarray) -> dict[str, np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    values = session.run(None, {name: np.ascontiguousarray(rows, dtype=np.float32)})
    return {o.name: np.asarray(v) for o, v in zip(session.get_outputs(), values, strict=True)}


def compact(model: onnx.ModelProto, *, fp16_biases: bool = True) -> onnx.ModelProto:
    """The same computation with the quantizer's fixed per-file overhead removed (in place).

    onnxruntime's quantizer leaves ~5 KB that is not weights: long derived tensor and node
    names (``coefficient1_quantized``, ``MatMul1_quant_output_scale_mul``...) each written
    several times, one zero point per weight tensor although all are the same scalar 0,
    value_info, ``onnx.infer``/``onnx.quant.pre_process`` metadata and opset imports of
    every domain onnxruntime knows. On a 10k-weight MLP that alone moved int8 from ~0.28x
    to ~0.35x of fp32. Here: identical initializers are shared, every internal tensor gets
    a 1-2 character name (graph input ``X`` and the output names are kept exactly), node
    names, doc strings, value_info, attributes equal to their schema default and metadata
    go, and only the opsets nodes use stay. Biases (float initializers of >= FP16_BIAS_MIN
    elements that only Add nodes read) are stored as float16 behind a Cast, which
    onnxruntime constant-folds when it loads the model: half the bytes, ~5e-4 relative
    error, far below the int8 weights' own. Per-tensor scales are kept (per-channel adds a
    float per output column); scaler attributes and small shape/class tensors stay as they
    are (a few dozen bytes each).
    """
    graph = model.graph
    if fp16_biases:
        _biases_as_fp16(graph)
    _share_identical_initializers(graph)
    _drop_default_attributes(graph, {entry.domain: entry.version for entry in model.opset_import})
    keep = {value.name for value in (*graph_inputs(graph), *graph.output)}
    names = _short_names(_tensor_names(graph), keep)
    _rename_all(graph, names)
    _strip(graph)
    del graph.value_info[:]
    graph.name = "lineside"
    model.doc_string = ""
    del model.metadata_props[:]
    model.producer_name = "lineside"
    model.producer_version = ""
    used = _node_domains(graph)
    kept = [entry for entry in model.opset_import if entry.domain in used or entry.domain == ""]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return dedupe_opsets(model)


def _biases_as_fp16(graph: onnx.GraphProto) -> None:
    """Store float32 bias vectors as float16 plus a Cast back to float32."""
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
        for sub in _node_subgraphs(node):
            for name in _tensor_names(sub):
                readers.setdefault(name, set()).add("<subgraph>")
    interface = {value.name for value in (*graph.input, *graph.output)}
    casts: list[onnx.NodeProto] = []
    for index, tensor in enumerate(graph.initializer):
        if (
            tensor.data_type != onnx.TensorProto.FLOAT
            or tensor.name in interface
            or readers.get(tensor.name) != {"Add"}
            or int(np.prod(tensor.dims)) < FP16_BIAS_MIN
        ):
            continue
        values = numpy_helper.to_array(tensor)
        half = values.astype(np.float16)
        if not np.all(np.isfinite(half)):
            continue  # beyond float16's range: keep it as it is
        name, stored = tensor.name, tensor.name + "_fp16"
        graph.initializer[index].CopyFrom(numpy_helper.from_array(half, stored))
        casts.append(helper.make_node("Cast", [stored], [name], to=onnx.TensorProto.FLOAT))
    if casts:
        nodes = [*casts, *graph.node]
        del graph.node[:]
        graph.node.extend(nodes)


def _drop_default_attributes(graph: onnx.GraphProto, opsets: dict[str, int]) -> None:
    """Remove attributes set to the value their operator schema defaults to anyway."""
    for node in graph.node:
        for sub in _node_subgraphs(node):
            _drop_default_attributes(sub, opsets)
        domain = "" if node.domain == "ai.onnx" else node.domain
        try:
            schema = onnx.defs.get_schema(node.op_type, opsets.get(domain, 1), domain)
        except onnx.defs.SchemaError:
            continue  # an op onnx does not know (com.microsoft...): leave it alone
        kept = []
        for attribute in node.attribute:
            spec = schema.attributes.get(attribute.name)
            default = spec.default_value if spec is not None else None
            if (
                default is not None
                and default.type == attribute.type
                and default.type != onnx.AttributeProto.UNDEFINED
                and helper.get_attribute_value(default) == helper.get_attribute_value(attribute)
            ):
                continue
            kept.append(attribute)
        if len(kept) != len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(kept)


def _share_identical_initializers(graph: onnx.GraphProto) -> None:
    """Keep one of each identical initializer (the weights' zero points, shape tensors)."""
    interface = {value.name for value in (*graph.input, *graph.output)}
    first: dict[tuple[int, tuple[int, ...], bytes], str] = {}
    alias: dict[str, str] = {}
    kept: list[onnx.TensorProto] = []
    for tensor in graph.initializer:
        content = numpy_helper.to_array(tensor)
        key = (tensor.data_type, tuple(tensor.dims), content.tobytes())
        if key in first and tensor.name not in interface:
            alias[tensor.name] = first[key]
            continue
        first.setdefault(key, tensor.name)
        kept.append(tensor)
    if not alias:
        return
    del graph.initializer[:]
    graph.initializer.extend(kept)
    _rename_all(graph, alias)


def _tensor_names(graph: onnx.GraphProto) -> list[str]:
    """Every tensor name in ``graph`` and its subgraphs, in first-seen order."""
    seen: dict[str, None] = {}
    for value in (*graph.input, *graph.output, *graph.initializer, *graph.value_info):
        seen.setdefault(value.name, None)
    for node in graph.node:
        for name in (*node.input, *node.output):
            if name:
                seen.setdefault(name, None)
        for sub in _node_subgraphs(node):
            for name in _tensor_names(sub):
                seen.setdefault(name, None)
    return list(seen)


def _short_names(names: Iterable[str], keep: set[str]) -> dict[str, str]:
    """Old -> new for every name not in ``keep``: a, b, ..., z, a0, a1, ..., skipping ``keep``."""
    alphabet = string.ascii_lowercase + string.digits

    def candidates() -> Iterator[str]:
        for length in itertools.count(1):
            for head in string.ascii_lowercase:
                for tail in itertools.product(alphabet, repeat=length - 1):
                    yield head + "".join(tail)

    fresh = (name for name in candidates() if name not in keep)
    return {name: next(fresh) for name in names if name not in keep}


def _rename_all(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Apply ``mapping`` to every tensor reference in ``graph`` and its subgraphs."""

    def renamed(values: Iterable[str]) -> list[str]:
        return [mapping.get(name, name) if name else name for name in values]

    for node in graph.node:
        node.input[:] = renamed(node.input)
        node.output[:] = renamed(node.output)
        for sub in _node_subgraphs(node):
            _rename_all(sub, mapping)
    for value in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        value.name = mapping.get(value.name, value.name)
    for sparse in graph.sparse_initializer:
        sparse.values.name = mapping.get(sparse.values.name, sparse.values.name)


def _strip(graph: onnx.GraphProto) -> None:
    """Drop node names and doc strings in ``graph`` and its subgraphs."""
    graph.doc_string = ""
    for node in graph.node:
        node.name = ""
        node.doc_string = ""
        for attribute in node.attribute:
            attribute.doc_string = ""
        for sub in _node_subgraphs(node):
            _strip(sub)
    for value in (*graph.input, *graph.output):
        value.doc_string = ""
    for tensor in graph.initializer:
        tensor.doc_string = ""


def _node_subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    subgraphs: list[onnx.GraphProto] = []
    for attribute in node.attribute:
        if attribute.HasField("g"):
            subgraphs.append(attribute.g)
        subgraphs.extend(attribute.graphs)
    return subgraphs


def _node_domains(graph: onnx.GraphProto) -> set[str]:
    domains: set[str] = set()
    for node in graph.node:
        domains.add(node.domain)
        for sub in _node_subgraphs(node):
            domains |= _node_domains(sub)
    return domains


def _check_quantized(
    original: onnx.ModelProto, quantized: onnx.ModelProto, settings: dict[str, object]
) -> None:
    """Trust the output, not the call: quantized ops present and a smaller file.

    ``size_ratio`` is against the fp32 file lineside ships. Whether int8 is worth a
    variant is judged against the fp32 graph compacted the same way (names, metadata,
    defaults; biases left fp32), so that stripping names cannot pass for quantization.
    """
    counts = quantized_op_counts(quantized)
    if not counts:
        raise VariantNotApplicable(
            f"int8: onnxruntime quantized no node; it quantizes {settings['op_types']} and "
            f"this graph has none with float weights"
        )
    settings["quantized_ops"] = dict(counts)
    if settings["mode"] == "static-qdq":
        # Say what the graph does, not what was asked: activations are quantized only where
        # the quantizer could type them (QuantizeLinear nodes).
        settings["quantized_activations"] = counts.get("QuantizeLinear", 0)
        if not settings["quantized_activations"]:
            settings["mode"] = "weights-only (static)"
            settings["activation_type"] = None
    settings["size_ratio"] = round(quantized.ByteSize() / original.ByteSize(), 3)
    compacted = compact(_copy(original), fp16_biases=False).ByteSize()
    ratio = quantized.ByteSize() / compacted
    settings["size_ratio_vs_compacted_fp32"] = round(ratio, 3)
    if ratio > MAX_INT8_SIZE_RATIO:
        raise VariantNotApplicable(
            f"int8: the quantized file is {ratio:.2f}x the fp32 file (both without names "
            f"and metadata); its weights are too few to pay for the scales, zero points "
            f"and (de)quantize nodes"
        )


def quantized_op_counts(model: onnx.ModelProto) -> Counter[str]:
    """Quantization ops in the graph, counted by type; empty when nothing was quantized."""
    int_initializers = {t.name for t in model.graph.initializer if t.data_type in _INTEGER_TYPES}
    counts: Counter[str] = Counter()
    for node in model.graph.node:
        integer_op = node.op_type.endswith("Integer") and bool(int_initializers & set(node.input))
        if node.op_type in _QUANTIZED_OPS or integer_op:
            counts[node.op_type] += 1
    return counts


def smoke_test(model: onnx.ModelProto) -> None:
    """Load and run ``model`` on two rows of zeros, as the device would; ConversionFailed if not."""
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(
            model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
        )
        first = session.get_inputs()[0]
        width = first.shape[-1] if isinstance(first.shape[-1], int) else 1
        session.run(None, {first.name: np.zeros((2, width), np.float32)})
    except Exception as exc:  # onnxruntime raises untyped Fail/InvalidGraph exceptions
        raise ConversionFailed(f"onnxruntime cannot run the variant: {exc}") from exc


# --- fp16 ----------------------------------------------------------------------------------


def _fp16_share(model: onnx.ModelProto) -> tuple[float, set[str]]:
    """Share of float parameter bytes fp16 can convert, and the ai.onnx.ml ops holding the rest.

    Standard-domain initializers/Constants can become float16; ai.onnx.ml ops
    (TreeEnsemble*, LinearClassifier, SVM*...) keep their float attributes as they are.
    """
    graph = model.graph
    convertible = sum(
        t.ByteSize() for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT
    )
    blocked = 0
    blocked_ops: set[str] = set()
    for node in graph.node:
        if node.domain == ML_DOMAIN:
            size = sum(4 * len(a.floats) + a.t.ByteSize() for a in node.attribute)
            blocked += size
            if size:
                blocked_ops.add(node.op_type)
        elif node.op_type == "Constant":
            convertible += sum(
                a.t.ByteSize() for a in node.attribute if a.t.data_type == onnx.TensorProto.FLOAT
            )
    total = convertible + blocked
    return (convertible / total if total else 0.0), blocked_ops


# ai.onnx.ml ops whose outputs are always float (the classifiers' label output is int64:
# onnx_build relabels classes to 0..C-1). ONNX shape inference leaves them untyped, and
# untyped tensors make both fp16 converters feed float32 into fp16 ops (graph won't load).
_ML_FLOAT_OUTPUT_OPS = frozenset(
    {
        "Scaler",
        "Normalizer",
        "Imputer",
        "Binarizer",
        "LinearRegressor",
        "SVMRegressor",
        "TreeEnsembleRegressor",
    }
)
_ML_CLASSIFIER_OPS = frozenset({"LinearClassifier", "SVMClassifier", "TreeEnsembleClassifier"})


def _annotate_ml_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with value_info types for the outputs of ai.onnx.ml ops of known output type."""
    typed = _copy(model)
    graph = typed.graph
    known = {v.name for v in (*graph.value_info, *graph.input, *graph.output)}
    for node in graph.node:
        if node.domain != ML_DOMAIN:
            continue
        for index, name in enumerate(node.output):
            if name in known:
                continue
            if node.op_type in _ML_FLOAT_OUTPUT_OPS:
                elem_type = onnx.TensorProto.FLOAT
            elif node.op_type in _ML_CLASSIFIER_OPS:
                elem_type = onnx.TensorProto.INT64 if index == 0 else onnx.TensorProto.FLOAT
            else:
                continue
            graph.value_info.append(helper.make_tensor_value_info(name, elem_type, None))
    return typed


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copied = onnx.ModelProto()
    copied.CopyFrom(model)
    return copied


def _fp16_onnxconverter_common(model: onnx.ModelProto) -> onnx.ModelProto:
    # It edits its argument in place; the fallback must get the untouched graph.
    converted: onnx.ModelProto = occ_float16.convert_float_to_float16(
        _copy(model), keep_io_types=True, disable_shape_infer=False
    )
    return converted


def _fp16_onnxruntime_transformers(model: onnx.ModelProto) -> onnx.ModelProto:
    # Imported here: only needed when onnxconverter_common's graph does not load.
    from onnxruntime.transformers import float16 as ort_float16

    converted: onnx.ModelProto = ort_float16.convert_float_to_float16(
        _copy(model),
        keep_io_types=True,
        op_block_list=sorted({*ort_float16.DEFAULT_OP_BLOCK_LIST, *_ml_ops(model)}),
    )
    return converted


def _fp16_as_raw_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store float16 initializers as raw bytes.

    The converters fill ``int32_data`` (one protobuf varint per half, ~2.5 bytes each),
    which left an MLP at 0.66x its fp32 size instead of ~0.5x.
    """
    for index, tensor in enumerate(model.graph.initializer):
        if tensor.data_type == onnx.TensorProto.FLOAT16 and not tensor.raw_data:
            array = numpy_helper.to_array(tensor)
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, tensor.name))
    return model


def _check_smaller(original: onnx.ModelProto, converted: onnx.ModelProto) -> None:
    ratio = converted.ByteSize() / original.ByteSize()
    if ratio > MAX_FP16_SIZE_RATIO:
        raise VariantNotApplicable(
            f"fp16: the converted file is {ratio:.2f}x the fp32 file; the weights are too few "
            f"to outweigh the Cast nodes it adds"
        )


def _ml_ops(model: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in model.graph.node if node.domain == ML_DOMAIN}


def _check_io_kept(original: onnx.ModelProto, converted: onnx.ModelProto) -> None:
    def signature(m: onnx.ModelProto) -> list[tuple[str, int]]:
        values = [*graph_inputs(m.graph), *m.graph.output]
        return [(v.name, v.type.tensor_type.elem_type) for v in values]

    if signature(original) != signature(converted):
        raise ConversionFailed("fp16 conversion changed the graph's input/output types")


# --- int8 ----------------------------------------------------------------------------------


class _ArrayReader(CalibrationDataReader):  # type: ignore[misc]
    """Feeds ``rows`` to the calibrator in batches of CALIBRATION_BATCH."""

    def __init__(self, input_name: str, rows: np.ndarray) -> None:
        self._input_name = input_name
        self._rows = rows
        self._batches = self._iterate()

    def _iterate(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self._rows), CALIBRATION_BATCH):
            yield {self._input_name: self._rows[start : start + CALIBRATION_BATCH]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        self._batches = self._iterate()


def _check_calibration(model: onnx.ModelProto, calibration: np.ndarray) -> np.ndarray:
    rows = np.asarray(calibration)
    if rows.ndim != 2 or rows.shape[0] == 0 or not np.issubdtype(rows.dtype, np.number):
        raise CalibrationDataError(
            f"calibration must be a non-empty [N, F] array, got {rows.shape}"
        )
    width = graph_inputs(model.graph)[0].type.tensor_type.shape.dim[-1]
    if width.HasField("dim_value") and width.dim_value != rows.shape[1]:
        raise CalibrationDataError(
            f"calibration has {rows.shape[1]} columns; the model takes {width.dim_value}"
        )
    if not np.all(np.isfinite(rows)):
        raise CalibrationDataError("calibration rows contain NaN or infinity")
    return np.ascontiguousarray(rows, dtype=np.float32)


def _pre_process(model: onnx.ModelProto, source: Path, target: Path) -> str:
    """onnxruntime's recommended pre-processing (shape inference + graph optimisation).

    Symbolic shape inference stops at ai.onnx.ml ops ("Incomplete symbolic shape
    inference", after dumping its partial model into the working directory), so graphs
    with such ops get ONNX shape inference only; "none" when that fails too.
    """
    attempts = [(True, "onnx-shape-inference")]
    if not _ml_ops(model):
        attempts.insert(0, (False, "symbolic+onnx"))
    for skip_symbolic, label in attempts:
        try:
            with _no_symbolic_dump():
                quant_pre_process(str(source), str(target), skip_symbolic_shape=skip_symbolic)
        except Exception:  # noqa: S112 - bare Exceptions on unknown ops; next fallback
            continue
        if target.exists():
            return label
    return "none"


@contextmanager
def _no_symbolic_dump() -> Iterator[None]:
    """Remove the partial model onnxruntime's symbolic shape inference leaves in the cwd."""
    dumps = [Path(SYMBOLIC_DUMP), Path(SYMBOLIC_DUMP + ".data")]
    existed = {path for path in dumps if path.exists()}
    try:
        yield
    finally:
        for path in dumps:
            if path not in existed:
                path.unlink(missing_ok=True)


def _quantize(source: Path, target: Path, calibration: np.ndarray | None) -> dict[str, object]:
    # DefaultTensorType: types ONNX shape inference cannot give are float here.
    # MatMul/Gemm outputs stay float (inputs and weights are still QDQ int8): a
    # second rounding after each layer took a 10k-weight MLPRegressor from 0.055 to 0.080
    # of its prediction spread (held-out rows), and its Q/DQ pairs cost bytes.
    extra_options: dict[str, object] = {
        "DefaultTensorType": onnx.TensorProto.FLOAT,
        "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],
    }
    try:
        if calibration is None:
            quantize_dynamic(
                source,
                target,
                op_types_to_quantize=list(DYNAMIC_OPS),
                weight_type=QuantType.QInt8,
                per_channel=False,
                extra_options=extra_options,
            )
            return {
                "mode": "dynamic",
                "op_types": "/".join(DYNAMIC_OPS),
                "weight_type": "QInt8",
                "activation_type": "QUInt8 (computed at run time)",
                "per_channel": False,
                "calibration_method": None,
                "calibration_rows": 0,
            }
        input_name = graph_inputs(onnx.load_model(source).graph)[0].name
        quantize_static(
            source,
            target,
            _ArrayReader(input_name, calibration),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(STATIC_OPS),
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=False,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options=extra_options,
        )
    except Exception as exc:  # onnxruntime.quantization raises bare Exceptions
        raise ConversionFailed(f"onnxruntime quantization failed: {exc}") from exc
    return {
        "mode": "static-qdq",
        "op_types": "/".join(STATIC_OPS),
        "weight_type": "QInt8",
        "activation_type": "QUInt8",
        "per_channel": False,
        "calibration_method": "MinMax",
        "calibration_rows": len(calibration),
    }
