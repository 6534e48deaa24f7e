"""Bounds on what one REST request may make the server hold: its body as sent, its body after content
decoding (gzip / deflate), and the pixels its encoded images claim. Over a bound: HTTP 413 with one line,
before the body is read further or a pixel is decoded. Torch-free.

MLServer's REST request class reads the whole body and gunzips it without a limit (a 2 MiB gzip body
inflated to 4 GiB); it is replaced here, in the process that loads this runtime (`vfpt-deploy serve`,
`mlserver start` and KServe alike), by one that counts bytes as they arrive and inflates incrementally.
The body limit follows the models served: the largest request a model accepts (max rows x 3 x H x W as
JSON numbers) plus room, at least MIN_BODY.
"""
from __future__ import annotations

import zlib

from fastapi import HTTPException
from mlserver.errors import MLServerError

MIN_BODY = 16 * 2**20
JSON_BYTES_PER_VALUE = 24  # '-1.2345678901234567e-05,' at most, as clients print float32 / float64 values
MAX_REQUEST_PIXELS = 160_000_000  # decoded pixels all the encoded images of one request may claim together
_limit = {"body": MIN_BODY}


class BodyError(MLServerError, HTTPException):
    """A request body refused while it is read. FastAPI turns any other exception raised there into a bare
    400 'error parsing the body'; an HTTPException passes through, and MLServer's handler (registered for
    MLServerError, first in the MRO) answers it as every other error: {"error": msg} with its status."""

    def __init__(self, msg: str, status_code: int = 400) -> None:
        Exception.__init__(self, msg)  # (the two bases' __init__ take different arguments)
        self.status_code, self.detail, self.headers = status_code, msg, None


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
    async for chunk in request.stream():
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


def check_claimed_pixels(claims: list[int]) -> None:
    """The encoded images of one request may claim MAX_REQUEST_PIXELS together (checked from their headers,
    before any is decoded)."""
    total = sum(claims)
    if total > MAX_REQUEST_PIXELS:
        raise TooLarge(f"the request's {len(claims)} images claim {total / 1e6:.0f} megapixels together, over this "
                       f"server's limit of {MAX_REQUEST_PIXELS / 1e6:.0f}; send fewer or smaller images per request")
