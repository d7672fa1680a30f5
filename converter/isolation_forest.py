"""lineside's own IsolationForest -> ONNX conversion.

skl2onnx turns each tree into its own TreeEnsembleRegressor plus Gather/Reshape/Add
glue: ~2,700 nodes and ~1 ms per row for 100 trees. The whole score is really one sum
over trees, so this graph is a single ``ai.onnx.ml`` TreeEnsembleRegressor
(aggregate SUM) whose leaf weights already carry each tree's share of the exponent,
then a handful of ops for scikit-learn's formula:

    path(leaf)    = depth(leaf) + c(n_samples_in_leaf)          (sklearn's _average_path_length)
    score_samples = -2 ** (-mean_over_trees(path) / c(max_samples))
    decision      = score_samples - offset_                     -> output ``score``
    label         = -1 where decision < 0 else 1                -> output ``label``

Leaf weight = -ln(2) * path / (n_trees * c(max_samples)), so the ensemble's sum S gives
decision = -exp(S) - offset_.

Thresholds: scikit-learn casts X to float32 and compares ``x <= threshold`` with float64
thresholds. The default ``thresholds="float64"`` casts X to double in the graph and keeps
thresholds and leaf weights in double (``*_as_tensor`` attributes), which reproduces
sklearn's tree walk exactly. ``"float32"`` stores thresholds rounded *down* to float32:
for a float32 x, ``x <= t`` iff ``x <= round_down(t)``, so the walk is still exact and
only the weight sum loses precision. ``"float32-nearest"`` (round to nearest, what a naive
conversion does) is kept for the benchmark: it can send near-threshold rows the wrong way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper
from sklearn.ensemble import IsolationForest
from sklearn.pipeline import Pipeline

from converter.errors import UnsupportedModelError
from converter.onnx_build import (
    INPUT_NAME,
    ML_DOMAIN,
    TARGET_OPSET,
    check_n_features,
    finalize,
    skl2onnx_convert,
    split_pipeline,
)

Thresholds = Literal["float64", "float32", "float32-nearest"]
_PREFIX = "iforest_"


@dataclass(frozen=True)
class _Forest:
    """Every tree of the forest flattened into TreeEnsemble's parallel arrays."""

    tree_ids: np.ndarray  # int64 per node
    node_ids: np.ndarray  # int64 per node (sklearn's node index within its tree)
    features: np.ndarray  # int64 per node, global feature index (0 on leaves)
    thresholds: np.ndarray  # float64 per node (0 on leaves)
    left: np.ndarray  # int64 per node
    right: np.ndarray  # int64 per node
    is_leaf: np.ndarray  # bool per node
    missing_left: np.ndarray  # int64 per node: NaN goes left (sklearn missing_go_to_left)
    leaf_weights: np.ndarray  # float64 per node (0 on split nodes)


def isolation_forest_to_onnx(
    model: Any, n_features: int, *, thresholds: Thresholds = "float64"
) -> onnx.ModelProto:
    """The canonical graph (``label``, ``score``) of an IsolationForest or Pipeline ending in one.

    Preprocessing steps are converted with skl2onnx and chained in front of the forest.
    """
    check_n_features(model, n_features)
    steps, forest = split_pipeline(model)
    if not isinstance(forest, IsolationForest):
        raise UnsupportedModelError(f"expected an IsolationForest, got {type(forest).__name__}")
    if not hasattr(forest, "estimators_"):
        raise UnsupportedModelError("the IsolationForest is not fitted")
    if steps:
        onx = skl2onnx_convert(Pipeline(steps), n_features)
        source = _single_float_output(onx)
        del onx.graph.output[:]
    else:
        onx = _empty_model(n_features)
        source = INPUT_NAME
    nodes, initializers = forest_nodes(forest, source, thresholds)
    onx.graph.node.extend(nodes)
    onx.graph.initializer.extend(initializers)
    onx.graph.output.extend(
        [
            helper.make_tensor_value_info("label", onnx.TensorProto.INT64, [None]),
            helper.make_tensor_value_info("score", onnx.TensorProto.FLOAT, [None]),
        ]
    )
    return finalize(onx)


def forest_nodes(
    forest: IsolationForest, source: str, thresholds: Thresholds = "float64"
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing ``label`` and ``score`` from the float32 tensor ``source``."""
    flat = _flatten(forest)
    nodes: list[onnx.NodeProto] = []
    x = source
    if thresholds == "float64":
        nodes.append(
            helper.make_node("Cast", [source], [f"{_PREFIX}x64"], to=onnx.TensorProto.DOUBLE)
        )
        x = f"{_PREFIX}x64"
    nodes.append(_ensemble_node(flat, x, f"{_PREFIX}exponent", thresholds))
    nodes.extend(_score_nodes(f"{_PREFIX}exponent"))
    initializers = [
        numpy_helper.from_array(
            np.array([-float(forest.offset_)], np.float64), f"{_PREFIX}neg_off"
        ),
        numpy_helper.from_array(np.array([-1], np.int64), f"{_PREFIX}flat"),
        numpy_helper.from_array(np.array(0.0, np.float64), f"{_PREFIX}zero"),
        numpy_helper.from_array(np.array(-1, np.int64), f"{_PREFIX}outlier"),
        numpy_helper.from_array(np.array(1, np.int64), f"{_PREFIX}inlier"),
    ]
    return nodes, initializers


def average_path_length(n_samples: np.ndarray) -> np.ndarray:
    """c(n): sklearn's ``_average_path_length`` (0 for n <= 1, 1 for n == 2)."""
    n = np.asarray(n_samples, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


# --- building blocks ----------------------------------------------------------------------


def _flatten(forest: IsolationForest) -> _Forest:
    n_trees = len(forest.estimators_)
    denominator = n_trees * float(average_path_length(np.array([forest._max_samples]))[0])
    n_in = int(forest.n_features_in_)
    parts: list[dict[str, np.ndarray]] = []
    for tree_id, (estimator, features) in enumerate(
        zip(forest.estimators_, forest.estimators_features_, strict=True)
    ):
        tree = estimator.tree_
        is_leaf = tree.children_left == -1
        # sklearn only indexes X[:, features] when each tree saw a subset (max_features < 1).
        local = np.where(is_leaf, 0, tree.feature).astype(np.int64)
        global_features = np.asarray(features)[local] if len(features) != n_in else local
        # compute_node_depths() counts the root as 1; sklearn subtracts that 1 again.
        path = tree.compute_node_depths() - 1.0 + average_path_length(tree.n_node_samples)
        # With a zero denominator (max_samples == 1) sklearn sets the ratio to 1.
        ratio = path / denominator if denominator != 0 else np.full(path.shape, 1.0 / n_trees)
        parts.append(
            {
                "tree_ids": np.full(tree.node_count, tree_id, np.int64),
                "node_ids": np.arange(tree.node_count, dtype=np.int64),
                "features": np.where(is_leaf, 0, global_features).astype(np.int64),
                "thresholds": np.where(is_leaf, 0.0, tree.threshold),
                "left": np.where(is_leaf, 0, tree.children_left).astype(np.int64),
                "right": np.where(is_leaf, 0, tree.children_right).astype(np.int64),
                "is_leaf": is_leaf,
                "missing_left": np.where(is_leaf, 0, tree.missing_go_to_left).astype(np.int64),
                "leaf_weights": np.where(is_leaf, -math.log(2.0) * ratio, 0.0),
            }
        )
    return _Forest(**{key: np.concatenate([p[key] for p in parts]) for key in parts[0]})


def _ensemble_node(flat: _Forest, x: str, out: str, thresholds: Thresholds) -> onnx.NodeProto:
    leaves = flat.is_leaf
    attributes: dict[str, Any] = {
        "n_targets": 1,
        "aggregate_function": "SUM",
        "post_transform": "NONE",
        "nodes_treeids": flat.tree_ids.tolist(),
        "nodes_nodeids": flat.node_ids.tolist(),
        "nodes_featureids": flat.features.tolist(),
        # sklearn sends x <= threshold to the left child, i.e. the "true" branch.
        "nodes_modes": ["LEAF" if leaf else "BRANCH_LEQ" for leaf in leaves],
        "nodes_truenodeids": flat.left.tolist(),
        "nodes_falsenodeids": flat.right.tolist(),
        "nodes_missing_value_tracks_true": flat.missing_left.tolist(),
        "target_treeids": flat.tree_ids[leaves].tolist(),
        "target_nodeids": flat.node_ids[leaves].tolist(),
        "target_ids": [0] * int(leaves.sum()),
    }
    if thresholds == "float64":
        attributes["nodes_values_as_tensor"] = numpy_helper.from_array(
            flat.thresholds.astype(np.float64), "nodes_values"
        )
        attributes["target_weights_as_tensor"] = numpy_helper.from_array(
            flat.leaf_weights[leaves].astype(np.float64), "target_weights"
        )
    else:
        attributes["nodes_values"] = _float32_thresholds(flat.thresholds, thresholds).tolist()
        attributes["target_weights"] = flat.leaf_weights[leaves].astype(np.float32).tolist()
    return helper.make_node(
        "TreeEnsembleRegressor",
        [x],
        [out],
        domain=ML_DOMAIN,
        name=f"{_PREFIX}trees",
        **attributes,
    )


def _float32_thresholds(values: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    rounded = values.astype(np.float32)
    if thresholds == "float32-nearest":
        return rounded
    # Largest float32 <= t: for float32 x, x <= t exactly when x <= that value.
    too_high = rounded.astype(np.float64) > values
    rounded[too_high] = np.nextafter(rounded[too_high], np.float32(-np.inf))
    return rounded


def _score_nodes(exponent: str) -> list[onnx.NodeProto]:
    p = _PREFIX
    double = onnx.TensorProto.DOUBLE
    return [
        # TreeEnsembleRegressor always outputs float32; the tail runs in double like sklearn.
        helper.make_node("Cast", [exponent], [f"{p}exponent64"], to=double),
        # exp(S) = 2 ** (-mean path / c(max_samples)) = -score_samples
        helper.make_node("Exp", [f"{p}exponent64"], [f"{p}minus_score_samples"]),
        # decision = score_samples - offset_ = (-offset_) - exp(S)
        helper.make_node("Sub", [f"{p}neg_off", f"{p}minus_score_samples"], [f"{p}decision2d"]),
        helper.make_node("Reshape", [f"{p}decision2d", f"{p}flat"], [f"{p}decision"]),
        helper.make_node("Cast", [f"{p}decision"], ["score"], to=onnx.TensorProto.FLOAT),
        # sklearn's predict: -1 where decision < 0 (in float64), else +1.
        helper.make_node("Less", [f"{p}decision", f"{p}zero"], [f"{p}is_outlier"]),
        helper.make_node("Where", [f"{p}is_outlier", f"{p}outlier", f"{p}inlier"], ["label"]),
    ]


def _empty_model(n_features: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        [],
        "lineside_isolation_forest",
        [helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, [None, n_features])],
        [],
    )
    opsets = [helper.make_opsetid(domain, version) for domain, version in TARGET_OPSET.items()]
    return helper.make_model(graph, opset_imports=opsets)


def _single_float_output(onx: onnx.ModelProto) -> str:
    outputs = onx.graph.output
    if len(outputs) != 1 or outputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise UnsupportedModelError("the preprocessing steps must produce one float tensor")
    return str(outputs[0].name)
