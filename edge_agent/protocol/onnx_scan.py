"""Refuse ONNX models that reference external data, without importing ``onnx``.

An ONNX tensor may live outside the model file (``data_location = EXTERNAL``
with a ``location`` path); onnxruntime then opens that path relative to the
model, and path-traversal bugs in that code have been re-fixed several times
since 2022. A lineside bundle never needs external data (docs/internals.md §1),
so any tensor with external data, anywhere in the model, is refused.

This walks the protobuf wire format and descends only into the message fields
that can contain tensors (ModelProto → graph, functions, training info;
GraphProto → node, initializer, sparse initializer; NodeProto → attribute;
AttributeProto → t, g, tensors, graphs, sparse tensors). Field numbers are
from onnx/onnx.proto3. A file that is not valid protobuf is refused too: what
cannot be checked is not run.
"""

from __future__ import annotations

import mmap
from pathlib import Path

from edge_agent.update_errors import UnsafeModel

__all__ = ["check_no_external_data"]

_MAX_DEPTH = 64  # nested subgraphs (If/Loop/Scan bodies)

# message -> {field number: child message} for length-delimited fields to descend into.
_CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "function": {7: "node", 11: "attribute"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {},
}
_TENSOR_EXTERNAL_DATA = 13  # repeated StringStringEntryProto
_TENSOR_DATA_LOCATION = 14  # enum, EXTERNAL = 1
_TENSOR_DIMS = 1  # repeated int64 (packed or not)
_INT64_SIGN = 1 << 63


class _MalformedError(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _MalformedError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _walk(buf: memoryview, start: int, end: int, kind: str, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise _MalformedError("nesting too deep")
    children = _CHILDREN[kind]
    dims: list[int] = []
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            if kind == "tensor":
                _tensor_varint(field, value, dims)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            if pos + length > end:
                raise _MalformedError("field runs past its message")
            if kind == "tensor":
                _tensor_bytes(buf, field, pos, pos + length, dims)
            if field in children:
                _walk(buf, pos, pos + length, children[field], depth + 1)
            pos += length
        else:  # groups (3, 4) are not used by ONNX; 6, 7 do not exist
            raise _MalformedError(f"wire type {wire}")
        if pos > end:
            raise _MalformedError("truncated field")
    _check_dims(dims, len(buf))  # every message kind: empty unless a tensor


def _tensor_varint(field: int, value: int, dims: list[int]) -> None:
    if field == _TENSOR_DATA_LOCATION and value == 1:
        raise UnsafeModel("the ONNX model stores a tensor as external data")
    if field == _TENSOR_DIMS:
        dims.append(value)


def _tensor_bytes(buf: memoryview, field: int, pos: int, end: int, dims: list[int]) -> None:
    if field == _TENSOR_EXTERNAL_DATA:
        raise UnsafeModel("the ONNX model stores a tensor as external data")
    if field == _TENSOR_DIMS:  # packed dims
        while pos < end:
            value, pos = _varint(buf, pos, end)
            dims.append(value)


def _check_dims(dims: list[int], file_size: int) -> None:
    """A stored tensor holds its elements in the file (external data is refused), at least
    half a byte each (4-bit types), so more elements than that is a lie meant to make the
    runtime allocate: refused before the runtime sees it."""
    negative = [d - (1 << 64) for d in dims if d & _INT64_SIGN]
    if negative:
        raise UnsafeModel(f"the ONNX model has a tensor with negative dimension {negative[0]}")
    if 0 in dims:
        return
    elements = 1
    for d in dims:
        elements *= d
        if elements > 2 * file_size + 64:
            raise UnsafeModel(
                f"the ONNX model declares a tensor of shape {dims}: more elements than its "
                f"{file_size}-byte file can hold"
            )


def check_no_external_data(path: Path) -> None:
    """Raise ``UnsafeModel`` if the ONNX file uses external data or is not protobuf."""
    with path.open("rb") as fh:
        if path.stat().st_size == 0:
            raise UnsafeModel("the ONNX model file is empty")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            buf = memoryview(mapped)
            try:
                _walk(buf, 0, len(buf), "model", 0)
            except _MalformedError as exc:
                raise UnsafeModel(f"the ONNX model is not valid protobuf: {exc}") from exc
            finally:
                buf.release()
