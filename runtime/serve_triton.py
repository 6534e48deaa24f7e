"""Triton's protocol extensions on MLServer, so a stock `tritonclient.http` / `tritonclient.grpc` works with
its default settings against `vfpt-deploy serve`:

  binary tensor data  (HTTP) request and response bodies of a JSON header (`Inference-Header-Content-Length`
                      bytes) followed by raw tensors (`binary_data_size` each); the default of tritonclient.http
  model configuration GET /v2/models/NAME[/versions/V]/config, gRPC ModelConfig: the Triton config of the
                      served model, built by runtime/triton_config.py as `vfpt-deploy triton` writes it
  statistics          GET /v2/models[/NAME[/versions/V]]/stats, gRPC ModelStatistics: counts and times of
                      this process's requests and inference calls
  repository index    POST /v2/repository/index with an empty body (what tritonclient.http sends) is `{}`
  classification      an output asked for with `classification: k` (tritonclient's class_count) comes back
                      as BYTES [B, k] "score:index:label" strings (runtime/serve_io.py, REST and gRPC)
and every 4xx answer is logged in one line with its request id (REST here; gRPC in serving.py's filter).

How MLServer is extended, and why this way:
- REST: a thin ASGI middleware (TritonLayer) in front of MLServer's FastAPI app, added with Starlette's own
  add_middleware when MLServer builds the app (mlserver.rest.server.create_app is wrapped). MLServer's
  custom handlers (per-model routes added after its own) cannot do it: binary bodies must be read before
  FastAPI parses JSON, `/v2/models/stats` is caught by MLServer's `/v2/models/{model_name}` route first,
  and the empty index body is refused (422) before any handler runs.
- gRPC: the two methods MLServer's service lacks (ModelConfig, ModelStatistics) are added to the same
  service name with a generic handler on MLServer's own grpc server (mlserver.grpc.server's
  add_GRPCInferenceServiceServicer_to_server is wrapped). Their messages come from tritonclient's protos,
  loaded into a private descriptor pool: Triton's and MLServer's protos share the package 'inference'.
- Binary input tensors never go through JSON: the middleware decodes them into numpy arrays / bytes kept
  beside the request (REQUEST, a context variable of the request's task) and the model reads them there
  (serve_io). The model runs in the HTTP server's process (`parallel_workers: 0`, what serve writes); a
  model in a worker process answers such a request with a 400 that says so.
Both hooks are put in when this module is imported: by `vfpt-deploy serve` before MLServer starts, and
under `mlserver start DIR` / KServe through settings.json's model_repository_implementation (this
module's ModelRepository: MLServer's own folder repository, named so that MLServer imports this module
while it reads its settings, before it builds its servers). Everything else (MLServer's settings, routes,
the V2 JSON protocol KServe speaks) is unchanged. Torch-free.
"""
from __future__ import annotations

import contextvars
import gzip
import logging
import math
import re
import struct
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from vfpt_deploy.text import printable

log = logging.getLogger("mlserver.vfpt")

HEADER = "inference-header-content-length"
SERVICE = "inference.GRPCInferenceService"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics", "model_repository"]
NUMPY_TYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
               "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
               "FP32": np.float32, "FP64": np.float64}
_MODEL = r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
_CONFIG = re.compile(_MODEL + "/config")
_STATS = re.compile(r"/v2/models(?:/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?)?/stats")
_INFER = re.compile(_MODEL + "/infer")


@dataclass
class RequestInfo:
    """What the middleware and the model share about one REST request: its id (the V2 request id once the
    model has seen it), the binary input tensors (name -> array or list of bytes), the outputs to send
    back as binary data (name -> True/False; "*" the request's default)."""

    id: str
    binary: dict = field(default_factory=dict)
    binary_outputs: dict = field(default_factory=dict)


REQUEST: contextvars.ContextVar[RequestInfo | None] = contextvars.ContextVar("vfpt_request", default=None)


class ClientError(Exception):
    def __init__(self, msg: str, status: int = 400) -> None:
        super().__init__(msg)
        self.status = status


# -- the models this process serves -------------------------------------------------------------------
# name -> model (runtime/serving.py's VFPTModel: .version, .triton_config(), .triton_stats())
models: dict = globals().get("models", {})


def _model(name: str, version: str | None):
    m = models.get(name)
    if m is None or (version and (m.version or "") != version):
        raise ClientError(f"model {name[:100]!r}{f' version {version[:20]!r}' if version else ''} is not served "
                          f"here; served: {', '.join(sorted(models)) or 'none'}", 404)
    return m


def stats_json(name: str | None, version: str | None) -> dict:
    """Triton's statistics response for one model, or every model when name is None."""
    chosen = [_model(name, version)] if name else [models[n] for n in sorted(models)]
    return {"model_stats": [m.triton_stats() for m in chosen]}


def config_message(name: str, version: str | None):
    return _model(name, version).triton_config()


# -- binary tensor data ---------------------------------------------------------------------------------
def split_binary(body: bytes, header_size: str) -> tuple[dict, dict]:
    """A binary-data request body -> (its JSON header with each binary input's data left empty, the binary
    inputs decoded: name -> numpy array, or list of bytes for BYTES)."""
    import orjson

    if not header_size.isdigit() or int(header_size) > len(body):
        raise ClientError(f"Inference-Header-Content-Length {header_size[:20]!r} is not a size within the "
                          f"{len(body)}-byte body; send the JSON header's length in bytes")
    n = int(header_size)
    try:
        head = orjson.loads(body[:n])
    except orjson.JSONDecodeError as e:
        raise ClientError(f"the request's JSON header (its first {n} bytes) is not valid JSON: {e}") from None
    if not isinstance(head, dict) or not isinstance(head.get("inputs"), list):
        raise ClientError("the request's JSON header has no 'inputs' list")
    offset, binary = n, {}
    for inp in head["inputs"]:
        params = inp.get("parameters") if isinstance(inp, dict) else None
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is None:
            continue
        name = str(inp.get("name"))[:100]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(body):
            raise ClientError(f"input {name!r}: binary_data_size {size!r} does not fit the {len(body) - offset} "
                              "bytes left in the body")
        binary[name] = _decode(name, str(inp.get("datatype")), inp.get("shape"), body[offset:offset + size])
        inp["data"] = []
        offset += size
    if offset != len(body):
        raise ClientError(f"the body has {len(body) - offset} bytes after the last binary input; each binary "
                          "input needs parameters.binary_data_size")
    return head, binary


def _decode(name: str, datatype: str, shape, raw: bytes):
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ClientError(f"input {name!r} has shape {str(shape)[:60]}; send a list of dimensions >= 0")
    if datatype == "BYTES":
        out, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw) or offset + 4 + struct.unpack_from("<I", raw, offset)[0] > len(raw):
                raise ClientError(f"input {name!r}: its binary BYTES data end inside an element (each element is a "
                                  "4-byte little-endian length, then that many bytes)")
            size = struct.unpack_from("<I", raw, offset)[0]
            out.append(raw[offset + 4:offset + 4 + size])
            offset += 4 + size
        if len(out) != math.prod(shape):
            raise ClientError(f"input {name!r} has {len(out)} BYTES elements but shape {shape} needs {math.prod(shape)}")
        return out
    dtype = NUMPY_TYPES.get(datatype)
    if dtype is None:
        raise ClientError(f"input {name!r} has datatype {datatype[:20]!r}, not a V2 datatype")
    need = math.prod(shape) * np.dtype(dtype).itemsize
    if len(raw) != need:
        raise ClientError(f"input {name!r} has {len(raw)} bytes of binary data but {datatype} {shape} needs {need}")
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def join_binary(body: bytes, wanted: dict) -> tuple[bytes, int] | None:
    """A JSON inference response -> (header + binary outputs, header size) for the outputs `wanted` as
    binary (name -> bool, "*" the default); None when none is."""
    import orjson

    resp = orjson.loads(body)
    blobs = []
    for out in resp.get("outputs") or []:
        if not wanted.get(out.get("name"), wanted.get("*", False)):
            continue
        data = out.pop("data", [])
        if out.get("datatype") == "BYTES":
            items = [e.encode() if isinstance(e, str) else bytes(e) for e in np.asarray(data, dtype=object).reshape(-1)]
            raw = b"".join(struct.pack("<I", len(e)) + e for e in items)
        else:
            raw = np.asarray(data, dtype=NUMPY_TYPES[out["datatype"]]).astype(
                np.dtype(NUMPY_TYPES[out["datatype"]]).newbyteorder("<")).tobytes()
        out.setdefault("parameters", {})["binary_data_size"] = len(raw)
        blobs.append(raw)
    if not blobs:
        return None
    head = orjson.dumps(resp)
    return head + b"".join(blobs), len(head)


# -- the REST middleware --------------------------------------------------------------------------------
class TritonLayer:
    """Pure ASGI middleware in front of MLServer's app: see the module docstring."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        info = RequestInfo(id=headers.get("x-request-id", "")[:128] or uuid.uuid4().hex)
        token = REQUEST.set(info)
        path, method = scope["path"], scope["method"]
        send = self._logging(scope, info, send)
        try:
            if method == "GET" and (m := _STATS.fullmatch(path)):
                return await self._answer(send, info, lambda: stats_json(m["name"], m["version"]))
            if method == "GET" and (m := _CONFIG.fullmatch(path)):
                from .triton_config import config_dict

                return await self._answer(send, info, lambda: config_dict(config_message(m["name"], m["version"])))
            if method == "POST" and path == "/v2/repository/index" and headers.get("content-length", "0") == "0" \
                    and "transfer-encoding" not in headers:
                scope = _with_body(scope, 2)
                receive = _once(b"{}")
            elif method == "POST" and HEADER in headers and _INFER.fullmatch(path):
                try:
                    body, scope = await self._binary_request(scope, receive, headers, info)
                except ClientError as e:
                    return await _json(send, info, e.status, {"error": str(e)})
                receive = _once(body)
            if method == "POST" and _INFER.fullmatch(path):
                send = self._binary_response(info, send)
            await self.app(scope, receive, send)
        finally:
            REQUEST.reset(token)

    async def _answer(self, send, info: RequestInfo, make) -> None:
        try:
            body = make()
        except ClientError as e:
            return await _json(send, info, e.status, {"error": str(e)})
        except Exception as e:  # a model's BadRequest (4xx), or e.g. tritonclient missing: one line, and on
            status = getattr(e, "status_code", 500)
            status = status if isinstance(status, int) and 400 <= status < 600 else 500
            return await _json(send, info, status, {"error": str(e).splitlines()[0][:300] if str(e) else type(e).__name__})
        await _json(send, info, 200, body)

    async def _binary_request(self, scope, receive, headers: dict, info: RequestInfo):
        from starlette.requests import Request

        from .serve_limits import BodyError, read_bounded

        try:
            body = await read_bounded(Request(scope, receive))
        except BodyError as e:
            raise ClientError(str(e), e.status_code) from None
        head, info.binary = split_binary(body, headers[HEADER])
        import orjson

        new = orjson.dumps(head)
        return new, _with_body(scope, len(new))

    def _binary_response(self, info: RequestInfo, send):
        """Buffer a 200 answer whose outputs the request asked for as binary data, and send it so."""
        state: dict = {}

        async def wrapped(message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] != 200 or not any(info.binary_outputs.values()):
                    state["pass"] = True
                    return await send(message)
                state["start"], state["parts"] = message, []
                return
            if state.get("pass") or message["type"] != "http.response.body":
                return await send(message)
            state["parts"].append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(state["parts"])
            start = state["start"]
            if any(k.lower() == b"content-encoding" and v.strip().lower() == b"gzip" for k, v in start["headers"]):
                body = gzip.decompress(body)  # MLServer's GZipMiddleware (Accept-Encoding): sent uncompressed
            joined = join_binary(body, info.binary_outputs)
            hdrs = [(k, v) for k, v in start["headers"]
                    if k.lower() not in (b"content-length", b"content-type", b"content-encoding")]
            if joined is not None:
                body, size = joined
                hdrs += [(b"content-type", b"application/octet-stream"),
                         (HEADER.encode(), str(size).encode())]
            else:
                hdrs += [(b"content-type", b"application/json")]
            hdrs.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": hdrs})
            await send({"type": "http.response.body", "body": body})

        return wrapped

    @staticmethod
    def _logging(scope, info: RequestInfo, send):
        """Every 4xx answer: one log line with the request id and the reason; every answer carries the id
        in its X-Request-Id header."""
        state: dict = {}

        async def wrapped(message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", info.id.encode("latin-1", "replace"))]}
                state["body"] = [] if 400 <= message["status"] < 500 else None
            elif message["type"] == "http.response.body" and state.get("body") is not None:
                state["body"].append(message.get("body", b""))
                if not message.get("more_body"):
                    # the path and the reason carry what the client sent (a model name): printable, so
                    # escape sequences in a URL cannot act on a terminal that shows the log
                    log.warning("request %s: HTTP %d %s %s: %s", printable(info.id), state["status"],
                                scope["method"], printable(scope["path"], 200),
                                printable(_reason(b"".join(state["body"]))))
            await send(message)

        return wrapped


def _reason(body: bytes) -> str:
    import orjson

    try:
        err = orjson.loads(body)
        msg = err.get("error") or err.get("detail") if isinstance(err, dict) else None
        if isinstance(msg, list):  # FastAPI's validation errors: the first one
            first = msg[0] if msg and isinstance(msg[0], dict) else {}
            msg = f"{first.get('msg', 'invalid request')} at {'.'.join(map(str, first.get('loc', [])))}"
    except (orjson.JSONDecodeError, AttributeError, TypeError):
        msg = None
    return " ".join(str(msg or body[:200].decode("utf-8", "replace")).split())[:400]


def _with_body(scope, size: int) -> dict:
    """The scope with Content-Length `size` and no Content-Encoding (the body was decoded here)."""
    headers = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"content-length", b"content-encoding",
                                                                       b"transfer-encoding", b"content-type")]
    return {**scope, "headers": headers + [(b"content-length", str(size).encode()),
                                           (b"content-type", b"application/json")]}


def _once(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _json(send, info: RequestInfo, status: int, obj) -> None:
    import orjson

    body = orjson.dumps(obj)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# -- gRPC: ModelConfig and ModelStatistics on MLServer's service ------------------------------------------
_messages: dict = globals().get("_messages", {})


def grpc_messages() -> dict:
    """Triton's ModelConfig/ModelStatistics request and response classes, from tritonclient's protos in a
    private descriptor pool (their package 'inference' is MLServer's too)."""
    if not _messages:
        import ast
        import importlib.util
        from pathlib import Path

        from google.protobuf import descriptor_pool, message_factory

        spec = importlib.util.find_spec("tritonclient")
        if spec is None:
            from vfpt_deploy.extras import MissingExtra, install_hint

            raise MissingExtra(f"Triton's gRPC ModelConfig / ModelStatistics need tritonclient's protos; "
                               f"{install_hint('tritonclient')}")
        pool = descriptor_pool.DescriptorPool()
        for name in ("model_config_pb2.py", "service_pb2.py"):
            tree = ast.parse((Path(spec.submodule_search_locations[0]) / "grpc" / name).read_text())
            pool.AddSerializedFile(next(n.args[0].value for n in ast.walk(tree) if isinstance(n, ast.Call)
                                        and getattr(n.func, "attr", "") == "AddSerializedFile"))
        for name in ("ModelConfigRequest", "ModelConfigResponse", "ModelStatisticsRequest", "ModelStatisticsResponse"):
            _messages[name] = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}"))
    return _messages


def grpc_handler():
    """A generic handler adding ModelConfig and ModelStatistics to MLServer's gRPC inference service."""
    import grpc

    msgs = grpc_messages()
    codes = {404: grpc.StatusCode.NOT_FOUND, 400: grpc.StatusCode.INVALID_ARGUMENT}

    async def call(request, context, method: str, make):
        try:
            return make()
        except ClientError as e:
            rid = dict(context.invocation_metadata() or ()).get("x-request-id", "-")
            log.warning("request %s: gRPC %s %s: %s", printable(rid), codes.get(e.status, grpc.StatusCode.UNKNOWN).name,
                        method, printable(str(e)))
            await context.abort(codes.get(e.status, grpc.StatusCode.UNKNOWN), str(e))
        except Exception as e:
            await context.abort(grpc.StatusCode.INTERNAL, str(e).splitlines()[0][:300] if str(e) else type(e).__name__)

    async def model_config(request, context):
        def make():
            resp = msgs["ModelConfigResponse"]()
            resp.config.ParseFromString(config_message(request.name, request.version).SerializeToString())
            return resp
        return await call(request, context, "ModelConfig", make)

    async def model_statistics(request, context):
        from google.protobuf import json_format

        def make():
            return json_format.ParseDict(stats_json(request.name or None, request.version or None),
                                         msgs["ModelStatisticsResponse"]())
        return await call(request, context, "ModelStatistics", make)

    def unary(fn, req):
        return grpc.unary_unary_rpc_method_handler(fn, request_deserializer=msgs[req].FromString,
                                                   response_serializer=lambda m: m.SerializeToString())

    return grpc.method_handlers_generic_handler(SERVICE, {
        "ModelConfig": unary(model_config, "ModelConfigRequest"),
        "ModelStatistics": unary(model_statistics, "ModelStatisticsRequest")})


# -- statistics kept by a model ---------------------------------------------------------------------------
class Stats:
    """One model's request statistics, as Triton reports them (durations in ns; counts of requests)."""

    KEYS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")

    def __init__(self) -> None:
        self.durations = {k: [0, 0] for k in self.KEYS}
        self.inference_count = 0  # rows inferred
        self.last_inference_ms = 0

    def add(self, key: str, ns: int) -> None:
        d = self.durations[key]
        d[0] += 1
        d[1] += max(0, int(ns))

    def as_json(self, name: str, version: str, batch_stats: dict) -> dict:
        """batch_stats: batch size -> (inference calls, ns) of the batcher this model's rows go through."""
        dur = lambda c, ns: {"count": int(c), "ns": int(ns)}  # noqa: E731
        return {
            "name": name, "version": version, "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": sum(c for c, _ in batch_stats.values()),
            "inference_stats": {**{k: dur(*v) for k, v in self.durations.items()},
                                "cache_hit": dur(0, 0), "cache_miss": dur(0, 0)},
            "batch_stats": [{"batch_size": b, "compute_input": dur(0, 0), "compute_infer": dur(c, ns),
                             "compute_output": dur(0, 0)} for b, (c, ns) in sorted(batch_stats.items())],
            "memory_usage": []}


def now_ms() -> int:
    return int(time.time() * 1000)


# -- hooks into MLServer -----------------------------------------------------------------------------------
def install() -> None:
    """Wrap MLServer's REST app factory and gRPC service registration (once per process): every MLServer
    built after this has the Triton layer."""
    import mlserver.grpc.server as grpc_server
    import mlserver.rest.server as rest_server

    if not getattr(rest_server.create_app, "vfpt_triton", False):
        create_app = rest_server.create_app

        def create_app_with_triton(*args, **kwargs):
            app = create_app(*args, **kwargs)
            app.add_middleware(TritonLayer)  # added last: outermost, sees the raw request first
            return app

        create_app_with_triton.vfpt_triton = True
        rest_server.create_app = create_app_with_triton
    if not getattr(grpc_server.add_GRPCInferenceServiceServicer_to_server, "vfpt_triton", False):
        add = grpc_server.add_GRPCInferenceServiceServicer_to_server

        def add_with_triton(servicer, server):
            add(servicer, server)
            try:
                server.add_generic_rpc_handlers((grpc_handler(),))
            except ImportError as e:  # no tritonclient: the V2 methods still work; say what is missing
                log.warning("gRPC ModelConfig / ModelStatistics are off: %s", e)

        add_with_triton.vfpt_triton = True
        grpc_server.add_GRPCInferenceServiceServicer_to_server = add_with_triton
    from mlserver.grpc.converters import RepositoryIndexResponseItemConverter as item

    if not getattr(item, "vfpt_triton", False):  # gRPC index states: "READY" as Triton (and MLServer's REST) say,
        from_types = item.from_types.__func__   # not Python 3.11's str() of the enum, "State.READY"

        def from_types_with_state(klass, type_object, *args, **kwargs):
            index = from_types(klass, type_object, *args, **kwargs)
            index.state = str(getattr(type_object.state, "value", type_object.state))
            return index

        item.from_types = classmethod(from_types_with_state)
        item.vfpt_triton = True


try:
    from mlserver.repository import SchemalessModelRepository as _FolderRepository
except ImportError:  # pragma: no cover - MLServer < 1.3
    _FolderRepository = object


class ModelRepository(_FolderRepository):
    """MLServer's own folder model repository, unchanged. settings.json names it (model_repository_
    implementation) so that `mlserver start DIR` imports this module while it reads its settings, before it
    builds its servers: the Triton layer is then in place there too."""


install()
