"""What a served VFPT model takes and gives over the V2 / Open Inference Protocol (REST and gRPC alike).

A request carries exactly one input:
  images       FP32  [B, 3, H, W]  preprocessed tensors, the exported model's own input (same name as in
                                   the ONNX, so one request body also works against Triton)
  image_bytes  BYTES [B]           encoded images (JPEG, PNG, ...), preprocessed on the server with the
                                   artifact's own preprocessing. REST/JSON cannot carry raw bytes: each
                                   element is a base64 string there. gRPC elements are the raw file bytes
                                   (base64 too if the input's parameters say content_type "base64").
Both inputs are listed in the model metadata, each marked `optional: true` with the other named as its
`alternative`: they are two forms of the same thing, and a request with both is refused in one line.
Over REST an input may also come as Triton binary tensor data (runtime/serve_triton.py decodes it).
Optionally the request parameter `top_k` (integer >= 1, default DEFAULT_TOP_K, at most the number of
classes) and the V2 `outputs` list to ask for some outputs only. The response has, per row of the request:
  logits               FP32  [B, C]
  top_k_labels         BYTES [B, k]  class names, best first (content_type "str")
  top_k_probabilities  FP32  [B, k]  softmax probabilities of those classes
  top_k_indices        INT64 [B, k]  their class indices
Triton's classification extension: `logits` asked for with the output parameter `classification: k`
(tritonclient's class_count) comes back as BYTES [B, k] "score:index:label" strings, the k largest logits
best first (score printed as C's %f, as Triton does).
A request that breaks any of this gets BadRequest: HTTP 400 / gRPC INVALID_ARGUMENT with one line that
names the problem. Torch-free.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
import struct
import uuid
from dataclasses import dataclass

import numpy as np
from PIL import Image
from mlserver.errors import MLServerError
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor, Parameters, ResponseOutput

from vfpt_deploy.errors import ImageError
from vfpt_deploy.artifacts.schema import INPUT_NAME, OUTPUT_NAME

from .preprocess import Preprocess
from .serve_limits import check_claimed_pixels
from .serve_triton import REQUEST, RequestInfo

BYTES_INPUT = "image_bytes"
LABELS, PROBS, INDICES = "top_k_labels", "top_k_probabilities", "top_k_indices"
OUTPUTS = (OUTPUT_NAME, LABELS, PROBS, INDICES)
DEFAULT_TOP_K = 5
_INPUTS_HINT = (f"send one input: '{BYTES_INPUT}' (BYTES [B], encoded JPEG/PNG; base64 strings in JSON) "
                f"or '{INPUT_NAME}' (FP32 [B, 3, H, W], preprocessed)")


class BadRequest(MLServerError):
    """A request this model cannot answer as sent (HTTP 400, gRPC INVALID_ARGUMENT)."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg, 400)


class ModelFault(MLServerError):
    """The model failed on a valid request (HTTP 500, gRPC INTERNAL): the server's fault, not the client's."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg, 500)


SANE_INPUT = 1e4  # |value| a preprocessed image never reaches (normalized pixels are a few units)


@dataclass(frozen=True)
class Parsed:
    """A checked request: either float32 rows (x) or encoded images (blobs), never both."""

    rows: int
    top_k: int
    outputs: tuple[str, ...]
    x: np.ndarray | None = None
    classification: tuple[tuple[str, int], ...] = ()  # (output, k): sent as "score:index:label" strings
    blobs: tuple[bytes, ...] | None = None


def _datatype(inp) -> str:
    return str(getattr(inp.datatype, "value", inp.datatype))


def _data(inp) -> list:
    data = getattr(inp.data, "root", inp.data)
    return list(data) if data is not None else []


def parse_request(payload: InferenceRequest, size: tuple[int, int], max_rows: int, num_classes: int) -> Parsed:
    """Check one request against the model (input size, classes) and the server's batch limit."""
    inputs = list(payload.inputs or [])
    if not inputs:
        raise BadRequest(f"the request has no inputs; {_INPUTS_HINT}")
    if len(inputs) > 1:
        raise BadRequest(f"the request has {len(inputs)} inputs ({', '.join(repr(i.name) for i in inputs)}); "
                         f"{_INPUTS_HINT}, not both")
    inp = inputs[0]
    top_k, outputs = _top_k(payload, num_classes), _outputs(payload)
    classify = _classification(payload, num_classes)
    if inp.name == INPUT_NAME:
        x = _tensor(inp, size, max_rows)
        return Parsed(rows=len(x), top_k=top_k, outputs=outputs, x=x, classification=classify)
    if inp.name == BYTES_INPUT:
        blobs = _blobs(inp, max_rows)
        return Parsed(rows=len(blobs), top_k=top_k, outputs=outputs, blobs=blobs, classification=classify)
    raise BadRequest(f"unknown input {inp.name!r}; {_INPUTS_HINT}")


def _binary(inp):
    """The input's Triton binary tensor data (decoded by runtime/serve_triton.py), or None for a JSON input."""
    size = getattr(inp.parameters, "binary_data_size", None) if inp.parameters is not None else None
    if size is None:
        return None
    info = REQUEST.get()
    if info is None or inp.name not in info.binary:
        raise BadRequest(f"input {inp.name!r} is binary tensor data, which reaches the model only over REST in the "
                         "server's own process (settings.json parallel_workers 0, as 'vfpt-deploy serve' writes it); "
                         "send the data in the JSON body")
    return info.binary[inp.name]


def _rows(shape, max_rows: int, name: str) -> int:
    b = shape[0]
    if b < 1:
        raise BadRequest(f"input '{name}' has batch size {b}; send at least one image")
    if b > max_rows:
        raise BadRequest(f"input '{name}' has batch size {b}, over this server's maximum of {max_rows} "
                         "(--max-batch-size); split the request")
    return b


def _tensor(inp, size: tuple[int, int], max_rows: int) -> np.ndarray:
    want = f"FP32 [B, 3, {size[0]}, {size[1]}]"
    if _datatype(inp) != "FP32":
        raise BadRequest(f"input '{INPUT_NAME}' must be {want}, got datatype {_datatype(inp)}; "
                         f"send float32 values, or encoded images as '{BYTES_INPUT}' (BYTES)")
    shape = [int(d) for d in inp.shape]
    if len(shape) != 4 or shape[1:] != [3, *size]:
        raise BadRequest(f"input '{INPUT_NAME}' must be {want}, got shape {shape}; preprocess the images to "
                         f"{size[0]}x{size[1]}, or send them encoded as '{BYTES_INPUT}'")
    rows = _rows(shape, max_rows, INPUT_NAME)
    binary = _binary(inp)
    try:
        x = np.asarray(_data(inp) if binary is None else binary, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(f"input '{INPUT_NAME}' data are not all numbers; send {want} float32 values") from None
    if x.size != math.prod(shape):
        raise BadRequest(f"input '{INPUT_NAME}' has {x.size} values but shape {shape} needs {math.prod(shape)}")
    if not np.isfinite(x).all():
        raise BadRequest(f"input '{INPUT_NAME}' holds NaN or Inf values (or numbers beyond float32); "
                         "send finite preprocessed values")
    return x.reshape(rows, 3, *size)


def _blobs(inp, max_rows: int) -> tuple[bytes, ...]:
    if _datatype(inp) != "BYTES":
        raise BadRequest(f"input '{BYTES_INPUT}' must be BYTES (encoded images), got datatype {_datatype(inp)}; "
                         f"send preprocessed float32 tensors as '{INPUT_NAME}'")
    shape = [int(d) for d in inp.shape]
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise BadRequest(f"input '{BYTES_INPUT}' must have shape [B] (one encoded image per element), got {shape}")
    rows = _rows(shape, max_rows, BYTES_INPUT)
    binary = _binary(inp)
    data = _data(inp) if binary is None else binary
    if data and isinstance(data[0], list):  # a nested JSON list: [[b64], [b64]] for shape [B, 1]
        data = [e for row in data for e in (row if isinstance(row, list) else [row])]
    if len(data) != rows:
        raise BadRequest(f"input '{BYTES_INPUT}' has {len(data)} elements but shape {shape}")
    b64 = str(getattr(inp.parameters, "content_type", "") or "") == "base64" if inp.parameters else False
    return tuple(_blob(e, i, b64) for i, e in enumerate(data))


def _blob(e, i: int, b64: bool) -> bytes:
    if isinstance(e, str) or b64:  # JSON strings are base64; gRPC bytes only when the client says so
        try:
            return base64.b64decode(e, validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise BadRequest(f"{BYTES_INPUT}[{i}] is not valid base64; over REST/JSON send each encoded image "
                             "as a base64 string") from None
    if isinstance(e, (bytes, bytearray)):
        return bytes(e)
    raise BadRequest(f"{BYTES_INPUT}[{i}] is a {type(e).__name__}, not an encoded image")


# gRPC: MLServer turns a ModelInferRequest's raw_input_contents into lists (mlserver.raw) before any model
# sees the request, trusting each tensor's datatype and shape; a mismatch there ended as INTERNAL with a
# traceback per request. check_grpc_request reads the same proto first and names the mismatch (BadRequest:
# INVALID_ARGUMENT); install_grpc_checks puts it in front of MLServer's converter.
ITEM_BYTES = {"BOOL": 1, "UINT8": 1, "UINT16": 2, "UINT32": 4, "UINT64": 8, "INT8": 1, "INT16": 2, "INT32": 4,
              "INT64": 8, "FP16": 2, "FP32": 4, "FP64": 8}  # V2 fixed-size datatypes; BYTES is length-prefixed


def check_grpc_request(req) -> None:
    """The raw tensors of a gRPC ModelInferRequest match their datatype and shape, one raw entry per input
    without contents (what mlserver.raw.inject_raw assumes); BadRequest naming the first mismatch."""
    raws = list(req.raw_input_contents)
    if not raws:
        return
    takers = [inp for inp in req.inputs if not inp.contents.ListFields()]  # inject_raw: inputs without data
    if len(raws) != len(takers):
        raise BadRequest(f"the request has {len(raws)} raw_input_contents for {len(takers)} inputs without contents; "
                         "send one raw_input_contents entry per input, in input order")
    for inp, raw in zip(takers, raws):
        shape = [int(d) for d in inp.shape]
        dtype = str(inp.datatype)[:20]
        if any(d < 0 for d in shape):
            raise BadRequest(f"input {inp.name[:80]!r} has shape {shape[:8]} with a negative dimension; "
                             "send the tensor's real shape")
        if dtype == "BYTES":
            _check_length_prefixed(inp.name, raw)
        elif dtype not in ITEM_BYTES:
            raise BadRequest(f"input {inp.name[:80]!r} has datatype {dtype!r}, not a V2 datatype "
                             f"({', '.join(ITEM_BYTES)}, BYTES)")
        elif len(raw) != math.prod(shape) * ITEM_BYTES[dtype]:
            raise BadRequest(f"input {inp.name[:80]!r} has {len(raw)} raw bytes but {dtype} {shape[:8]} needs "
                             f"{math.prod(shape) * ITEM_BYTES[dtype]}; send raw contents that match the shape")


def _check_length_prefixed(name: str, raw: bytes) -> None:
    """BYTES raw contents: each element a 4-byte little-endian length, then that many bytes."""
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw) or offset + 4 + struct.unpack_from("<I", raw, offset)[0] > len(raw):
            raise BadRequest(f"input {name[:80]!r} raw contents end inside an element: each BYTES element needs a "
                             "4-byte little-endian length prefix followed by that many bytes")
        offset += 4 + struct.unpack_from("<I", raw, offset)[0]


def install_grpc_checks() -> None:
    """Check every gRPC inference request with check_grpc_request before MLServer converts it (once per
    process); whatever the conversion still cannot read is a BadRequest too, never INTERNAL."""
    from mlserver.grpc.converters import ModelInferRequestConverter as cls

    if getattr(cls, "vfpt_checked", False):
        return
    convert = cls.to_types.__func__

    def to_types(klass, pb_object):
        # the request id: the client's, else one made here (MLServer would make one later), so that the
        # log line of a refused request and the response carry the same id
        rid = pb_object.id or uuid.uuid4().hex
        REQUEST.set(RequestInfo(id=rid))  # this RPC's task only
        check_grpc_request(pb_object)
        try:
            payload = convert(klass, pb_object)
            payload.id = rid
            return payload
        except (struct.error, ValueError, TypeError, IndexError, KeyError, OverflowError) as e:
            raise BadRequest(f"the request's tensors cannot be read: {str(e)[:200]}; check each input's datatype, "
                             "shape and contents") from None

    cls.to_types = classmethod(to_types)
    cls.vfpt_checked = True


class _Named(io.BytesIO):
    """Image bytes that name themselves in load_image's error lines ('image_bytes[3] is not ...')."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.label = name

    def __str__(self) -> str:
        return self.label


def decode_images(blobs: tuple[bytes, ...], preprocess: Preprocess) -> np.ndarray:
    """Encoded images -> float32 [B, 3, H, W], with load_image's checks (pixel limit before decoding,
    EXIF orientation, any mode to RGB). CPU work: run it off the event loop."""
    named = [_Named(b, f"{BYTES_INPUT}[{i}]") for i, b in enumerate(blobs)]
    try:
        check_claimed_pixels([_claimed(n) for n in named])  # from the headers, before any decoding
        return preprocess.batch(named)  # one at a time, only the preprocessed arrays kept
    except ImageError as e:
        raise BadRequest(str(e)) from None


def _claimed(blob) -> int:
    """The pixels an encoded image's header claims (0 when unreadable: load_image then names the problem)."""
    try:
        with Image.open(blob) as im:
            w, h = im.size
    except Exception:  # PIL raises many types for a bad header; decoding reports it properly
        return 0
    finally:
        blob.seek(0)
    return w * h


def _top_k(payload: InferenceRequest, num_classes: int) -> int:
    k = getattr(payload.parameters, "top_k", None) if payload.parameters is not None else None
    if k is None:
        return min(DEFAULT_TOP_K, num_classes)
    if isinstance(k, str) and k.strip().isdigit():  # gRPC clients often send parameters as strings
        k = int(k)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise BadRequest(f"parameter top_k must be an integer >= 1, got {k!r}")
    return min(k, num_classes)


def _outputs(payload: InferenceRequest) -> tuple[str, ...]:
    asked = [o.name for o in payload.outputs or []]
    unknown = [n for n in asked if n not in OUTPUTS]
    if unknown:
        raise BadRequest(f"unknown output {unknown[0]!r}; this model gives {', '.join(OUTPUTS)}")
    return tuple(dict.fromkeys(asked)) or OUTPUTS


def _classification(payload: InferenceRequest, num_classes: int) -> tuple[tuple[str, int], ...]:
    """(output, k) for each output asked for with Triton's `classification` parameter (k capped at the
    number of classes, as Triton does); only `logits` holds one score per class."""
    out = []
    for o in payload.outputs or []:
        k = getattr(o.parameters, "classification", None) if o.parameters is not None else None
        if k is None:
            continue
        if isinstance(k, str) and k.strip().isdigit():
            k = int(k)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise BadRequest(f"output {o.name!r}: classification must be an integer >= 1, got {k!r}")
        if o.name != OUTPUT_NAME:
            raise BadRequest(f"output {o.name!r} cannot be classified; ask for '{OUTPUT_NAME}' with class_count "
                             "(one score per class)")
        out.append((o.name, min(k, num_classes)))
    return tuple(out)


def binary_outputs(payload: InferenceRequest) -> dict:
    """Which outputs a REST request wants as Triton binary data: name -> bool, "*" the request's default
    (parameters.binary_data_output; each output's own parameters.binary_data wins)."""
    default = getattr(payload.parameters, "binary_data_output", None) if payload.parameters is not None else None
    wanted = {"*": default is True}
    for o in payload.outputs or []:
        flag = getattr(o.parameters, "binary_data", None) if o.parameters is not None else None
        if isinstance(flag, bool):
            wanted[o.name] = flag
    return wanted


def classified(values: np.ndarray, k: int, classes: list[str]) -> list[bytes]:
    """Triton's classification strings of [B, C] values: per row the k largest, "score:index:label"."""
    idx = np.argsort(-values.astype(np.float64), axis=1, kind="stable")[:, :k]
    return [f"{float(values[r, j]):f}:{j}:{classes[j]}".encode() for r in range(len(values)) for j in idx[r]]


def encode_response(logits: np.ndarray, parsed: Parsed, classes: list[str], name: str,
                    version: str | None) -> InferenceResponse:
    """Logits [B, C] -> the outputs asked for. Top-k as Predictor.predict: softmax in float64, ties kept
    in class order."""
    z = logits.astype(np.float64)
    if not np.isfinite(z).all():
        bad = int(np.flatnonzero(~np.isfinite(z).all(axis=1))[0])
        x = parsed.x
        if x is not None and np.abs(x[bad]).max() > SANE_INPUT:  # the client's extreme values overflowed it
            raise BadRequest(f"the model's logits are not finite (NaN or Inf) for row {bad} of this request, whose "
                             f"values reach {float(np.abs(x[bad]).max()):.3g}; send preprocessed images (values of a few "
                             "units)")
        raise ModelFault(f"the model gave non-finite logits (NaN or Inf) for row {bad} of a valid request: the "
                         "artifact is broken (NaN/Inf weights?); check it with 'vfpt-deploy verify ARTIFACT'")
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    idx = np.argsort(-p, axis=1, kind="stable")[:, :parsed.top_k]
    b, k = idx.shape
    values = {
        OUTPUT_NAME: ("FP32", list(logits.shape), logits.astype(np.float32).reshape(-1).tolist(), "np"),
        LABELS: ("BYTES", [b, k], [classes[j].encode() for j in idx.reshape(-1)], "str"),  # JSON: strings again
        PROBS: ("FP32", [b, k], np.take_along_axis(p, idx, axis=1).astype(np.float32).reshape(-1).tolist(), "np"),
        INDICES: ("INT64", [b, k], idx.reshape(-1).tolist(), "np"),
    }
    for n, k in parsed.classification:  # Triton's classification extension replaces the output's values
        values[n] = ("BYTES", [b, k], classified(logits, k, classes), "str")
    outputs = [ResponseOutput(name=n, datatype=values[n][0], shape=values[n][1], data=values[n][2],
                              parameters=Parameters(content_type=values[n][3])) for n in parsed.outputs]
    return InferenceResponse(model_name=name, model_version=version, outputs=outputs)


def metadata_tensors(size: tuple[int, int], num_classes: int) -> tuple[list, list]:
    """The V2 model-metadata description of the inputs and outputs above (-1: any size)."""
    inputs = [MetadataTensor(name=INPUT_NAME, datatype="FP32", shape=[-1, 3, *size],
                             parameters=Parameters(optional=True, alternative=BYTES_INPUT)),
              MetadataTensor(name=BYTES_INPUT, datatype="BYTES", shape=[-1],
                             parameters=Parameters(optional=True, alternative=INPUT_NAME))]
    outputs = [MetadataTensor(name=OUTPUT_NAME, datatype="FP32", shape=[-1, num_classes]),
               MetadataTensor(name=LABELS, datatype="BYTES", shape=[-1, -1]),
               MetadataTensor(name=PROBS, datatype="FP32", shape=[-1, -1]),
               MetadataTensor(name=INDICES, datatype="INT64", shape=[-1, -1])]
    return inputs, outputs
