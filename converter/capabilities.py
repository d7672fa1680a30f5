"""The honest capability matrix: which estimator converts to which variant, and why not.

Each "no" carries the reason the format builder gives (``unsupported_reason`` in
``onnx_build`` and ``tflite_build``), observed on the real converters, not assumed.
"""

from __future__ import annotations

from converter.variants import VARIANTS

# Rows: the preprocessing steps, then the final estimators lineside converts (the ONNX
# builder's lists are the source; TFLite covers a subset of them).
_PREPROCESSING_ORDER = ("StandardScaler", "MinMaxScaler", "RobustScaler", "PCA")


def estimators() -> tuple[str, ...]:
    from converter import onnx_build

    steps = [n for n in _PREPROCESSING_ORDER if n in onnx_build.SUPPORTED_PREPROCESSING]
    return (*steps, *sorted(onnx_build.SUPPORTED_ESTIMATORS))


def matrix() -> dict[str, dict[str, str | None]]:
    """estimator -> variant -> None (supported) or the reason it is not."""
    from converter import onnx_build, tflite_build

    table: dict[str, dict[str, str | None]] = {}
    for name in estimators():
        row: dict[str, str | None] = {}
        for variant in VARIANTS:
            module = onnx_build if variant.startswith("onnx") else tflite_build
            row[variant] = module.unsupported_reason(name, variant)
        table[name] = row
    return table


def render_text(table: dict[str, dict[str, str | None]]) -> str:
    """A plain table plus numbered footnotes for every "no"."""
    width = max(len(n) for n in table) + 2
    lines = ["".ljust(width) + "".join(v.ljust(13) for v in VARIANTS)]
    notes: dict[str, int] = {}
    for name, row in table.items():
        cells = []
        for variant in VARIANTS:
            reason = row[variant]
            if reason is None:
                cells.append("yes".ljust(13))
            else:
                number = notes.setdefault(reason, len(notes) + 1)
                cells.append(f"no [{number}]".ljust(13))
        lines.append(name.ljust(width) + "".join(cells))
    lines.append("")
    lines.append("yes: the variant applies. fp16/int8 of a model too small to shrink is still")
    lines.append("skipped, with the measured size ratio as the reason.")
    lines += [f"[{n}] {reason}" for reason, n in notes.items()]
    return "\n".join(lines)


def render_markdown(table: dict[str, dict[str, str | None]]) -> str:
    head = "| estimator | " + " | ".join(VARIANTS) + " |"
    rule = "|---" * (len(VARIANTS) + 1) + "|"
    rows = [
        f"| {name} | "
        + " | ".join("yes" if r is None else f"no: {r}" for r in (row[v] for v in VARIANTS))
        + " |"
        for name, row in table.items()
    ]
    return "\n".join([head, rule, *rows])
