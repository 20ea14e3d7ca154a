"""The Open Inference Protocol (KServe V2 / Triton HTTP) on the wire: bytes in, arrays out, back.

Pure functions, no Ray and no HTTP framework: `parse_infer_request` reads an infer body (JSON, or
JSON + binary tensors with `Inference-Header-Content-Length`, or a raw single input when that
header is 0), `encode_infer_response` writes the answer (binary outputs when asked), and
`classify_strings` is the classification extension. Every client mistake is a `V2Error` with the
HTTP status to answer; nothing here allocates more than the body already holds before the sizes
have been checked. Protocol facts: /work/shared/docs/inference-protocol.md.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# V2 datatype -> numpy dtype (little-endian); BYTES elements are length-prefixed byte strings
DTYPES: dict[str, Any] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"), "BYTES": None,
}  # fmt: skip
EXTENSIONS = ["binary_tensor_data", "classification"]
HEADER = "inference-header-content-length"


class V2Error(ValueError):
    """A request the client got wrong (or cannot be served): status + message for `{"error"}`."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Tensor:
    """One input: numeric tensors as numpy arrays of `shape`, BYTES ones as a list of bytes."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any  # np.ndarray, or list[bytes] for BYTES


@dataclass
class OutputSpec:
    """One requested output: binary or JSON (None: the request's default), classification k."""

    name: str
    binary: bool | None = None
    classification: int | None = None


@dataclass
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: list[OutputSpec] | None  # None: every output of the model
    binary_output: bool = False  # `parameters.binary_data_output`
    raw: bool = False  # the body was one raw input (header length 0)
    parameters: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- BYTES elements


def serialize_bytes(elements: list[bytes]) -> bytes:
    """BYTES tensor wire form: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def deserialize_bytes(buf: bytes | memoryview, count: int) -> list[bytes]:
    """Exactly `count` length-prefixed elements filling `buf`; V2Error if it does not add up."""
    out, pos, view = [], 0, memoryview(buf)
    for i in range(count):
        if pos + 4 > len(view):
            raise V2Error(f"BYTES data ends inside element {i}'s length (of {count} elements)")
        (n,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + n > len(view):
            raise V2Error(f"BYTES element {i} claims {n} bytes but only {len(view) - pos} remain")
        out.append(bytes(view[pos : pos + n]))
        pos += n
    if pos != len(view):
        raise V2Error(f"BYTES data has {len(view) - pos} bytes after its {count} elements")
    return out


# ----------------------------------------------------------------------------- requests


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise V2Error(f"{where}: shape must be a list of non-negative integers, got {value!r}")
    return tuple(value)


def _flatten(data: Any, where: str) -> list[Any]:
    """Row-major flat list of nested JSON lists (iterative: a deep nesting cannot overflow)."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _json_tensor(name: str, datatype: str, shape: tuple[int, ...], data: Any) -> Any:
    flat = _flatten(data, name)
    count = math.prod(shape)
    if len(flat) != count:
        raise V2Error(f"input {name!r}: shape {list(shape)} needs {count} values, got {len(flat)}")
    if datatype == "BYTES":
        if not all(isinstance(x, str) for x in flat):
            raise V2Error(f"input {name!r}: BYTES data in JSON must be strings")
        return [x.encode("utf-8") for x in flat]
    dtype = DTYPES[datatype]
    if datatype == "BOOL":
        ok = all(isinstance(x, bool) for x in flat)
    elif dtype.kind in "ui":
        ok = all(isinstance(x, int) and not isinstance(x, bool) for x in flat)
        info = np.iinfo(dtype)
        ok = ok and all(info.min <= x <= info.max for x in flat)
    else:
        ok = all(isinstance(x, int | float) and not isinstance(x, bool) for x in flat)
    if not ok:
        raise V2Error(f"input {name!r}: data are not all valid {datatype} values")
    return np.asarray(flat, dtype=dtype).reshape(shape)


def _binary_tensor(name: str, datatype: str, shape: tuple[int, ...], buf: memoryview) -> Any:
    count = math.prod(shape)
    if datatype == "BYTES":
        return deserialize_bytes(buf, count)
    dtype = DTYPES[datatype]
    if count * dtype.itemsize != len(buf):
        raise V2Error(
            f"input {name!r}: binary_data_size {len(buf)} does not match shape {list(shape)} "
            f"x {datatype} ({count * dtype.itemsize} bytes)"
        )
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def _header_length(body: bytes, header: str | None) -> int | None:
    if header is None:
        return None
    try:
        n = int(header.strip())
    except ValueError:
        raise V2Error(f"Inference-Header-Content-Length {header!r} is not a number") from None
    if not 0 <= n <= len(body):
        raise V2Error(
            f"Inference-Header-Content-Length {n} is outside the body's {len(body)} bytes"
        )
    return n


def parse_infer_request(
    body: bytes, header_length: str | None, raw_input: tuple[str, str] = ("image_bytes", "BYTES")
) -> InferRequest:
    """An infer request body -> InferRequest. `header_length` is the Inference-Header-Content-
    Length header (None when absent: the body is all JSON; "0": the body is one raw input, named
    and typed by `raw_input`, shape [1]). V2Error (400) for anything malformed."""
    n = _header_length(body, header_length)
    if n == 0:
        name, datatype = raw_input
        if not body:
            raise V2Error("the body is empty: send the raw input bytes")
        data: Any = [bytes(body)] if datatype == "BYTES" else np.frombuffer(body, DTYPES[datatype])
        return InferRequest(None, [Tensor(name, datatype, (1,), data)], None, raw=True)
    text = body if n is None else body[:n]
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise V2Error(f"the request header is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(doc, dict):
        raise V2Error("the request must be a JSON object with `inputs`")
    params = doc.get("parameters") or {}
    inputs = doc.get("inputs")
    if not isinstance(params, dict):
        raise V2Error("`parameters` must be an object")
    if not isinstance(inputs, list) or not inputs:
        raise V2Error("`inputs` must be a non-empty list of tensors")
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise V2Error("`id` must be a string")
    binary = memoryview(body)[n:] if n is not None else memoryview(b"")
    pos, tensors = 0, []
    for i, t in enumerate(inputs):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise V2Error(f"inputs[{i}] must be an object with a string `name`")
        name, datatype = t["name"], t.get("datatype")
        if datatype not in DTYPES:
            raise V2Error(f"input {name!r}: unknown datatype {datatype!r} (one of {list(DTYPES)})")
        shape = _shape(t.get("shape"), f"input {name!r}")
        tparams = t.get("parameters") or {}
        if not isinstance(tparams, dict):
            raise V2Error(f"input {name!r}: `parameters` must be an object")
        size = tparams.get("binary_data_size")
        if (size is None) == ("data" not in t):
            raise V2Error(f"input {name!r}: give exactly one of `data` and binary_data_size")
        if size is None:
            tensors.append(Tensor(name, datatype, shape, _json_tensor(name, datatype, shape,
                                                                      t["data"])))  # fmt: skip
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise V2Error(f"input {name!r}: binary_data_size must be a non-negative integer")
        if pos + size > len(binary):
            raise V2Error(
                f"input {name!r}: binary_data_size {size} but only {len(binary) - pos} binary "
                "bytes remain in the body"
            )
        tensors.append(
            Tensor(name, datatype, shape, _binary_tensor(name, datatype, shape,
                                                         binary[pos : pos + size]))
        )  # fmt: skip
        pos += size
    if pos != len(binary):
        raise V2Error(f"the body has {len(binary) - pos} bytes after the last binary input")
    outputs = _outputs(doc.get("outputs"))
    binary_output = _flag(params, "binary_data_output", "parameters")
    return InferRequest(rid, tensors, outputs, binary_output, parameters=params)


def _flag(params: dict[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise V2Error(f"{where}.{key} must be true or false")
    return value


def _outputs(value: Any) -> list[OutputSpec] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise V2Error("`outputs` must be a list")
    out = []
    for i, o in enumerate(value):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise V2Error(f"outputs[{i}] must be an object with a string `name`")
        p = o.get("parameters") or {}
        if not isinstance(p, dict):
            raise V2Error(f"output {o['name']!r}: `parameters` must be an object")
        k = p.get("classification")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise V2Error(f"output {o['name']!r}: classification must be an integer >= 1")
        binary = p.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise V2Error(f"output {o['name']!r}: binary_data must be true or false")
        out.append(OutputSpec(o["name"], binary, k))
    return out


# ----------------------------------------------------------------------------- responses


def classify_strings(scores: np.ndarray, k: int, labels: list[str]) -> np.ndarray:
    """The classification extension: (N, K) scores -> BYTES (N, min(k, K)) of
    b"score:index:label", highest score first (ties in index order), score with six decimals."""
    k = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = np.empty((scores.shape[0], k), dtype=object)
    for r, row in enumerate(order):
        for c, i in enumerate(row):
            out[r, c] = f"{float(scores[r, i]):f}:{int(i)}:{labels[i]}".encode()
    return out


def _wire(datatype: str, data: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes(list(data.reshape(-1)))
    return np.ascontiguousarray(data, dtype=DTYPES[datatype]).tobytes()


def _json_data(datatype: str, data: np.ndarray) -> list[Any]:
    if datatype == "BYTES":
        return [e.decode("utf-8", "replace") for e in data.reshape(-1)]
    return data.reshape(-1).tolist()


def encode_infer_response(
    model_name: str,
    request_id: str | None,
    outputs: list[tuple[str, str, np.ndarray, bool]],
    model_version: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """(body, headers) for outputs [(name, datatype, array, binary)]. Binary outputs follow the
    JSON header in order; `Inference-Header-Content-Length` is then set (clients need it)."""
    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = model_version
    if request_id is not None:
        doc["id"] = request_id
    tensors, blobs = [], []
    for name, datatype, data, binary in outputs:
        t: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(data.shape)}
        if binary:
            blob = _wire(datatype, data)
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            t["data"] = _json_data(datatype, data)
        tensors.append(t)
    doc["outputs"] = tensors
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


# ----------------------------------------------------------------------------- metadata


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "raycls", "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(
    name: str, shape: tuple[int, int, int], classes: list[str], version: str = "1"
) -> dict[str, Any]:
    """What a V2 client needs to call the model: two alternative inputs (send one), -1 for N."""
    k = len(classes)
    return {
        "name": name,
        "versions": [version],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "images", "datatype": "UINT8", "shape": [-1, *shape]},
            {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "logits", "datatype": "FP32", "shape": [-1, k]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, k]},
        ],
        "parameters": {"classes": list(classes), "inputs": "send exactly one of the two inputs"},
    }
