"""The V2 codec on its own (no Ray, no HTTP): request bodies in, arrays out, responses back, and
tritonclient's own encoder and decoder on the other side of the wire."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raycls.serving import v2codec
from raycls.serving.v2codec import V2Error, parse_infer_request


def binary_request(header: dict, *blobs: bytes) -> tuple[bytes, str]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), str(len(head))


def test_tritonclient_request_body_parses_to_the_same_array():
    import tritonclient.http as httpclient

    images = np.random.default_rng(0).integers(0, 255, (3, 1, 8, 8), dtype=np.uint8)
    inp = httpclient.InferInput("images", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images)
    out = httpclient.InferRequestedOutput("logits", class_count=3)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [inp], outputs=[out], request_id="42"
    )
    req = parse_infer_request(body, None if json_size is None else str(json_size))
    assert req.id == "42"
    (t,) = req.inputs
    assert (t.name, t.datatype, t.shape) == ("images", "UINT8", (3, 1, 8, 8))
    np.testing.assert_array_equal(t.data, images)
    assert req.outputs[0].name == "logits" and req.outputs[0].classification == 3
    assert req.outputs[0].binary is True


def test_json_and_bytes_inputs():
    data = [[[[1, 2], [3, 4]]]]
    req = parse_infer_request(json.dumps({"inputs": [
        {"name": "images", "datatype": "UINT8", "shape": [1, 1, 2, 2], "data": data}]}).encode(),
        None)  # fmt: skip
    assert req.inputs[0].data.tolist() == data and req.outputs is None
    blobs = [b"\x89PNG-a", b"", b"jpeg..."]
    wire = v2codec.serialize_bytes(blobs)
    t = {"name": "image_bytes", "datatype": "BYTES", "shape": [3],
         "parameters": {"binary_data_size": len(wire)}}  # fmt: skip
    body, n = binary_request({"inputs": [t]}, wire)
    assert parse_infer_request(body, n).inputs[0].data == blobs
    raw = parse_infer_request(b"\x89PNG...", "0")
    assert raw.raw and raw.inputs[0].data == [b"\x89PNG..."] and raw.inputs[0].shape == (1,)


GOOD = {"name": "images", "datatype": "UINT8", "shape": [1, 1, 2, 2]}


@pytest.mark.parametrize(
    "body,header,needle",
    [
        (b"not json", None, "not valid JSON"),
        (b"[]", None, "JSON object"),
        (b'{"inputs": []}', None, "non-empty"),
        (b"{}", "99", "outside the body"),
        (b"{}", "-1", "outside the body"),
        (b"{}", "x", "not a number"),
        (json.dumps({"inputs": [{**GOOD, "parameters": {"binary_data_size": 4}}]}).encode()
         + b"\0" * 5, "trailing", "after the last binary input"),
        (json.dumps({"inputs": [{**GOOD, "parameters": {"binary_data_size": 4}}]}).encode()
         + b"\0" * 3, "missing", "only 3 binary bytes remain"),
        (json.dumps({"inputs": [{**GOOD, "parameters": {"binary_data_size": 3}}]}).encode()
         + b"\0" * 3, "size", "does not match shape"),
        (json.dumps({"inputs": [{**GOOD, "data": [1, 2, 3, 4],
                                 "parameters": {"binary_data_size": 4}}]}).encode(), "both",
         "exactly one of"),
        (json.dumps({"inputs": [{**GOOD, "data": [1, 2, 3]}]}).encode(), None, "needs 4 values"),
        (json.dumps({"inputs": [{**GOOD, "data": [1, 2, 3, 300]}]}).encode(), None,
         "valid UINT8"),
        (json.dumps({"inputs": [{**GOOD, "datatype": "FP99", "data": [1]}]}).encode(), None,
         "unknown datatype"),
        (json.dumps({"inputs": [{**GOOD, "shape": [1, -2], "data": [1]}]}).encode(), None,
         "non-negative"),
        (json.dumps({"inputs": [{**GOOD, "data": [1, 2, 3, 4]}], "outputs": [
            {"name": "logits", "parameters": {"classification": 0}}]}).encode(),
         None, "classification must be"),
        (b"[" * 100_000 + b"]" * 100_000, None, "JSON"),
    ],
)  # fmt: skip
def test_malformed_requests_are_400(body, header, needle):
    if header in ("trailing", "missing", "size", "both"):
        header = str(body.index(b"}]}") + 3)
    with pytest.raises(V2Error, match=needle) as e:
        parse_infer_request(body, header)
    assert e.value.status == 400


def test_bytes_elements_that_do_not_add_up():
    with pytest.raises(V2Error, match="claims"):
        v2codec.deserialize_bytes(struct.pack("<I", 10) + b"abc", 1)
    with pytest.raises(V2Error, match="after its"):
        v2codec.deserialize_bytes(v2codec.serialize_bytes([b"a"]) + b"x", 1)
    with pytest.raises(V2Error, match="ends inside"):
        v2codec.deserialize_bytes(b"\1\0", 1)


def test_classification_strings_sorted_with_labels():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0]], np.float32)
    out = v2codec.classify_strings(scores, 2, ["a", "b", "c"])
    assert out.shape == (2, 2)
    assert out.tolist() == [[b"0.700000:1:b", b"0.200000:2:c"], [b"0.500000:0:a", b"0.500000:1:b"]]
    assert v2codec.classify_strings(scores, 10, ["a", "b", "c"]).shape == (2, 3)


def test_response_decodes_with_tritonclient():
    from tritonclient.http import InferResult

    logits = np.arange(6, dtype=np.float32).reshape(2, 3)
    cls = v2codec.classify_strings(logits, 2, ["x", "y", "z"])
    body, headers = v2codec.encode_infer_response(
        "m", "7", [("logits", "FP32", logits, True), ("probabilities", "BYTES", cls, True)]
    )
    assert headers["content-type"] == "application/octet-stream"
    result = InferResult.from_response_body(
        body, header_length=int(headers["inference-header-content-length"])
    )
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)
    assert result.as_numpy("probabilities").tolist() == cls.tolist()
    assert result.get_response()["id"] == "7" and result.get_response()["model_name"] == "m"
    body, headers = v2codec.encode_infer_response("m", None, [("logits", "FP32", logits, False)])
    assert "inference-header-content-length" not in headers
    assert json.loads(body)["outputs"][0]["data"] == logits.reshape(-1).tolist()


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=300), header=st.one_of(st.none(), st.integers(-5, 400).map(str)))
def test_fuzz_only_v2errors(body, header):
    """Any bytes: parsed or refused with V2Error 400, never another exception."""
    try:
        parse_infer_request(body, header)
    except V2Error as e:
        assert e.status == 400


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=4),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    inputs=st.lists(st.fixed_dictionaries({
        "name": st.sampled_from(["images", "image_bytes", 3]),
        "datatype": st.sampled_from(["UINT8", "BYTES", "FP32", "BOOL", "X"]),
        "shape": st.lists(st.integers(-1, 5), max_size=4) | json_values,
    }, optional={"data": json_values, "parameters": st.fixed_dictionaries(
        {}, optional={"binary_data_size": st.integers(-1, 50) | json_values})}), max_size=3),
    outputs=json_values, tail=st.binary(max_size=60),
)  # fmt: skip
def test_fuzz_structured_requests_only_v2errors(inputs, outputs, tail):
    head = json.dumps({"inputs": inputs, "outputs": outputs}).encode()
    try:
        parse_infer_request(head + tail, str(len(head)))
    except V2Error as e:
        assert e.status == 400
