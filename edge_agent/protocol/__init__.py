"""The wire protocol shared by the edge agent and registry_sync (docs/protocol.md).

Pure modules with no third-party imports: ``topics`` (topic tree), ``canonical``
(canonical JSON), ``ed25519`` (signature verification), ``manifest`` (the signed
manifest), ``chunks`` (chunked transfer) and ``onnx_scan`` (external-data check).
"""

from __future__ import annotations
