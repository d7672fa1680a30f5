"""`--log-to-registry`: put each bundle next to its source and the parity certificate
on the model version, so the MLflow UI shows them beside the version."""

from __future__ import annotations

from typing import Any

from converter.errors import SourceError
from converter.source import tracking_uri_from, translate_mlflow_errors


def log_bundles(result: Any, *, tracking_uri: str | None) -> dict[str, str]:
    """Log written bundles under ``lineside/<variant>/`` of the source run; tag the version.

    Returns the tags set on the model version (empty when the source is not registered).
    """
    from mlflow import MlflowClient

    source = result.source
    if not source.run_id:
        raise SourceError(
            f"{source.uri}: --log-to-registry needs a model logged in a run; "
            "a local directory has none"
        )
    uri = tracking_uri_from(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    written = [v for v in result.variants if v.status == "written"]
    tags = version_tags(result)
    with translate_mlflow_errors(source.uri):
        for v in written:
            client.log_artifacts(source.run_id, str(v.path), artifact_path=f"lineside/{v.variant}")
        if source.registered_name and source.version:
            for key, value in tags.items():
                client.set_model_version_tag(source.registered_name, source.version, key, value)
    return tags if source.registered_name else {}


def version_tags(result: Any) -> dict[str, str]:
    """Model-version tags: the variants, their sizes, sha256 and parity figures."""
    written = [v for v in result.variants if v.status == "written"]
    tags = {"lineside.variants": ",".join(v.variant for v in written)}
    for v in written:
        prefix = f"lineside.{v.variant}"
        tags[f"{prefix}.size_bytes"] = str(v.size)
        tags[f"{prefix}.sha256"] = v.sha256 or ""
        tags[f"{prefix}.parity"] = _parity_text(v.parity)
    for v in result.variants:
        if v.status == "failed":
            tags[f"lineside.{v.variant}.parity"] = f"FAILED: {v.reason}"[:4000]
    return tags


def _parity_text(report: Any) -> str:
    if report is None:
        return "n/a"
    parts = ["pass" if report.passed else "FAIL"]
    if report.label_agreement_validation is not None:
        parts.append(f"label_agreement={report.label_agreement_validation:.4%}")
    if report.max_abs_error:
        parts.append(f"max_abs_error={max(report.max_abs_error.values()):.3e}")
    if report.regression_rel_error is not None:
        parts.append(f"regression_rel_error={report.regression_rel_error:.3e}")
    parts.append(f"rows={report.rows_validation}")
    return " ".join(parts)
