"""Bounds on what one REST request may make the server hold: its body as sent, its body after content
decoding (gzip / deflate), and the pixels its encoded images claim. Over a bound: HTTP 413 with one line,
before the body is read further or a pixel is decoded. Torch-free.

MLServer's REST request class reads the whole body and gunzips it without a limit (a 2 MiB gzip body
inflated to 4 GiB); it is replaced here, in the process that loads this runtime (`vfpt-deploy serve`,
`mlserver start` and KServe alike), by one that counts bytes as they arrive and inflates incrementally.
The body limit follows the models served: the largest request a model accepts (max rows x 3 x H x W as
JSON numbers) plus room, at least MIN_BODY.

Time is bounded too: uvicorn (MLServer's HTTP server) waits for a request body without any limit, so a
client that sends its headers and part of a body and then stalls would hold its connection (and the
request's memory) forever. The body must arrive within BODY_TIMEOUT_S, or one second per MiB of the body limit
where that is more (a large model's largest request at 1 MiB/s; env VFPT_SERVE_BODY_TIMEOUT_S sets it), else
HTTP 408 with one line and the connection is closed; other requests are answered meanwhile. Likewise a
request's headers must be complete within HEADER_TIMEOUT_S of the connection (or of the request's first
byte on a kept-alive one; env VFPT_SERVE_HEADER_TIMEOUT_S), else 408 and the connection is closed (set on
uvicorn's protocol classes, which have no such limit of their own).
"""
from __future__ import annotations

import asyncio
import os
import zlib

from fastapi import HTTPException
from mlserver.errors import MLServerError

MIN_BODY = 16 * 2**20
JSON_BYTES_PER_VALUE = 24  # '-1.2345678901234567e-05,' at most, as clients print float32 / float64 values
MAX_REQUEST_PIXELS = 160_000_000  # decoded pixels all the encoded images of one request may claim together
BODY_TIMEOUT_S = 60.0  # the whole body, from the first read (at least; see body_timeout): a stalled client is cut off
HEADER_TIMEOUT_S = 10.0  # a request's line and headers


def _seconds(env: str, default: float) -> float:
    text = os.environ.get(env, "")
    try:
        value = float(text) if text else default
    except ValueError:
        value = default
    return value if 0 < value <= 3600 else default


_limit = {"body": MIN_BODY, "timeout": _seconds("VFPT_SERVE_BODY_TIMEOUT_S", 0) or None,
          "header_timeout": _seconds("VFPT_SERVE_HEADER_TIMEOUT_S", HEADER_TIMEOUT_S)}


def body_timeout() -> float:
    """Seconds a whole request body may take: the environment's, else BODY_TIMEOUT_S or 1 s per MiB of the
    body limit, whichever is more."""
    return _limit["timeout"] or max(BODY_TIMEOUT_S, body_limit() / 2**20)


class BodyError(MLServerError, HTTPException):
    """A request body refused while it is read. FastAPI turns any other exception raised there into a bare
    400 'error parsing the body'; an HTTPException passes through, and MLServer's handler (registered for
    MLServerError, first in the MRO) answers it as every other error: {"error": msg} with its status."""

    def __init__(self, msg: str, status_code: int = 400) -> None:
        Exception.__init__(self, msg)  # (the two bases' __init__ take different arguments)
        self.status_code, self.detail, self.headers = status_code, msg, None

    def __str__(self) -> str:  # the one line, without starlette's "413: " prefix
        return self.detail


class TooLarge(BodyError):
    """HTTP 413: the request is over a stated bound."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg, 413)


def allow_model(max_rows: int, size: tuple[int, int]) -> int:
    """Raise the body limit to what a model with `max_rows` rows of 3 x H x W accepts; returns the limit."""
    need = max_rows * 3 * size[0] * size[1] * JSON_BYTES_PER_VALUE + 2**20
    _limit["body"] = max(_limit["body"], need)
    return _limit["body"]


def body_limit() -> int:
    return _limit["body"]


async def read_bounded(request) -> bytes:
    """A starlette Request's body, at most body_limit() bytes as sent and after gzip / deflate decoding."""
    limit = body_limit()
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the request body is {int(declared)} bytes, over this server's limit of {limit} bytes; "
                       "send fewer or smaller images per request")
    encodings = [e.strip().lower() for v in request.headers.getlist("content-encoding") for e in v.split(",")]
    encodings = [e for e in encodings if e and e != "identity"]
    if len(encodings) > 1 or (encodings and encodings[0] not in ("gzip", "deflate")):
        raise BodyError(f"Content-Encoding {', '.join(encodings)} is not supported; send gzip, deflate or none", 415)
    inflate = zlib.decompressobj(wbits=47) if encodings else None  # 47: gzip or zlib header, detected
    parts, sent, size = [], 0, 0
    async for chunk in _timed(request.stream(), body_timeout()):
        sent += len(chunk)
        if sent > limit:
            raise TooLarge(f"the request body is over this server's limit of {limit} bytes; send fewer or smaller "
                           "images per request")
        if inflate is not None:
            chunk = _inflate(inflate, chunk, limit - size)
        size += len(chunk)
        parts.append(chunk)
    if inflate is not None:
        tail = inflate.flush()
        size += len(tail)
        if size > limit:
            raise _inflated_too_large(limit)
        parts.append(tail)
        if not inflate.eof:
            raise BodyError(f"the {encodings[0]} request body is truncated")
    return b"".join(parts)


async def _timed(stream, timeout: float):
    """The chunks of `stream`, all of them within `timeout` seconds; else HTTP 408 (the connection is closed:
    uvicorn does not keep a connection whose request body was not read to its end)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    it = stream.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(it.__anext__(), max(deadline - loop.time(), 0.001))
        except StopAsyncIteration:
            return
        except asyncio.TimeoutError:
            raise BodyError(f"the request body did not arrive within {timeout:g} s (the client stalled or is too slow); "
                            "send the whole body at once", 408) from None
        yield chunk


def _inflate(inflate, chunk: bytes, room: int) -> bytes:
    try:
        out = inflate.decompress(chunk, room + 1)  # at most one byte past the room: enough to know it is over
    except zlib.error as e:
        raise BodyError(f"the request body is not valid gzip/deflate ({e})") from None
    if len(out) > room or inflate.unconsumed_tail:
        raise _inflated_too_large(room)
    return out


def _inflated_too_large(limit: int) -> TooLarge:
    return TooLarge(f"the request body inflates past this server's limit of {limit} bytes (a compression bomb?); "
                    "send fewer or smaller images per request")


def install() -> None:
    """Replace MLServer's REST request body reader with read_bounded (once per process)."""
    from mlserver.rest import requests

    cls = requests.Request
    if getattr(cls, "vfpt_bounded", False):
        return

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            self._body = await read_bounded(self)
        return self._body

    cls.body = body
    cls.vfpt_bounded = True
    _bound_header_time(_limit["header_timeout"])


REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"


def _bound_header_time(timeout: float) -> None:
    """uvicorn waits for a request's line and headers without a limit (its keep-alive timer runs only while
    a connection is idle between requests, and stops at the first byte): answer 408 and close a connection
    whose request headers are not complete within `timeout` seconds of the connection or of the request's
    first byte. Set on both of uvicorn's HTTP/1.1 protocols (h11, what MLServer installs; httptools)."""
    protocols = []
    try:
        import h11
        from uvicorn.protocols.http.h11_impl import H11Protocol

        protocols.append((H11Protocol, lambda self: self.conn.their_state is h11.IDLE))
    except ImportError:
        pass
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        protocols.append((HttpToolsProtocol, lambda self: self.cycle is None or self.cycle.response_complete))
    except ImportError:
        pass
    for proto, waiting in protocols:
        if not getattr(proto, "vfpt_header_timeout", False):
            _time_headers(proto, waiting, timeout)


def _time_headers(proto, waiting, timeout: float) -> None:
    made, received, lost = proto.connection_made, proto.data_received, proto.connection_lost

    def disarm(self) -> None:
        timer = getattr(self, "_vfpt_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._vfpt_header_timer = None

    def expire(self) -> None:
        self._vfpt_header_timer = None
        if self.transport.is_closing() or not waiting(self):
            return
        msg = (f'{{"error":"the request headers did not arrive within {timeout:g} s (the client stalled or is too '
               f'slow); send the whole request at once"}}').encode()
        self.transport.write(REQUEST_TIMEOUT + b"content-length: %d\r\n\r\n" % len(msg) + msg)
        self.transport.close()

    def connection_made(self, transport) -> None:
        made(self, transport)
        self._vfpt_header_timer = self.loop.call_later(timeout, expire, self)

    def data_received(self, data: bytes) -> None:
        received(self, data)  # parses what came: the headers may now be complete
        if self.transport.is_closing() or not waiting(self):
            disarm(self)
        elif getattr(self, "_vfpt_header_timer", None) is None:  # the first bytes of the next request
            self._vfpt_header_timer = self.loop.call_later(timeout, expire, self)

    def connection_lost(self, exc) -> None:
        disarm(self)
        lost(self, exc)

    proto.connection_made, proto.data_received, proto.connection_lost = connection_made, data_received, connection_lost
    proto.vfpt_header_timeout = True


def check_claimed_pixels(claims: list[int]) -> None:
    """The encoded images of one request may claim MAX_REQUEST_PIXELS together (checked from their headers,
    before any is decoded)."""
    total = sum(claims)
    if total > MAX_REQUEST_PIXELS:
        raise TooLarge(f"the request's {len(claims)} images claim {total / 1e6:.0f} megapixels together, over this "
                       f"server's limit of {MAX_REQUEST_PIXELS / 1e6:.0f}; send fewer or smaller images per request")
