"""ASGI middleware in front of every route: API keys, and upload size and idle limits.

Both act before FastAPI parses a request (FastAPI reads the whole multipart body before any
dependency runs, so a dependency would come too late). The ingress configures them per replica
through `api.state` (`configure`). FastAPI's own `max_body_size` is not used: Starlette's
limiter replaces any response to an oversized request by a plain-text 413, not OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import Iterable, Optional

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.admission import Admission, route_path
from serve_app.errors import APIError, UploadTooLargeError, create_error_response, error_response_for

OPEN_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
"""Routes that need no API key: health checks, the web page and the docs (which hold no data)."""
OPEN_PREFIXES = ("/static/",)
"""The page's and the docs' files, as `OPEN_PATHS`."""


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class ApiKeys:
    """Accepted API keys, kept as SHA-256 digests.

    Args:
        keys: Each a key as clients send it, or "sha256:<hex digest>" of one (so a config
            file need not hold the key itself).
    """

    def __init__(self, keys: Iterable[str]):
        self._digests = []
        for key in keys:
            key = key.strip()
            if not key:
                continue
            if key.startswith("sha256:"):
                digest = bytes.fromhex(key[len("sha256:"):])
                if len(digest) != 32:
                    raise ValueError("An API key given as sha256: must be 64 hexadecimal digits.")
            else:
                digest = hashlib.sha256(key.encode()).digest()
            self._digests.append(digest)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def accepts(self, key: str) -> bool:
        digest = hashlib.sha256(key.encode()).digest()
        # Every digest is compared, in constant time each, whichever matches.
        return sum(hmac.compare_digest(digest, d) for d in self._digests) > 0


MULTIPART_ALLOWANCE_BYTES = 1024 * 1024
"""Room for the form fields and multipart framing around a file of `max_upload_bytes`."""


def configure(app, *, admission: Admission, api_keys: ApiKeys, upload_idle_timeout_s: float, max_upload_bytes: int) -> None:
    """Sets this replica's guards on the FastAPI app (the middleware read them from `app.state`)."""
    app.state.admission = admission
    app.state.api_keys = api_keys
    app.state.upload_idle_timeout_s = upload_idle_timeout_s
    app.state.max_upload_bytes = max_upload_bytes


class RequireApiKey:
    """401 in OpenAI's shape for a request without a valid `Authorization: Bearer <key>`,
    when API keys are configured; open paths (`is_open`) and CORS preflights pass."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys: Optional[ApiKeys] = getattr(scope["app"].state, "api_keys", None) if scope["type"] == "http" else None
        if not keys or is_open(route_path(scope)) or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            message, code = "No API key provided: send it as 'Authorization: Bearer <key>'.", "missing_api_key"
        elif not keys.accepts(key.strip()):
            message, code = "Incorrect API key provided.", "invalid_api_key"
        else:
            await self.app(scope, receive, send)
            return
        response = create_error_response(401, message, type="invalid_request_error", code=code, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class UploadStalledError(APIError):
    def __init__(self, idle_s: float):
        super().__init__(408, f"The upload sent nothing for {idle_s:g} s and was dropped.", param="file", code="upload_timeout")


class UploadLimits:
    """Refuses a body over `max_upload_bytes` (plus `MULTIPART_ALLOWANCE_BYTES`): at once when
    its Content-Length says so, else as soon as that much has arrived; and ends a body that
    stops arriving for `upload_idle_timeout_s`. While FastAPI reads the body, the errors are
    raised from `receive`, and the ingress answers them (413, 408) in OpenAI's shape."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["app"].state if scope["type"] == "http" else None
        max_upload = getattr(state, "max_upload_bytes", None)
        if not max_upload:
            await self.app(scope, receive, send)
            return
        idle_s, limit = state.upload_idle_timeout_s, max_upload + MULTIPART_ALLOWANCE_BYTES
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = error_response_for(UploadTooLargeError(None, max_upload))
            response.headers["Connection"] = "close"  # the body behind it is not read
            await response(scope, receive, send)
            return
        received = 0
        body_done = False

        async def receive_within_limits() -> Message:
            nonlocal received, body_done
            if body_done:  # a streamed answer waits here for the client to leave: no idle limit
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), idle_s)
            except asyncio.TimeoutError:
                raise UploadStalledError(idle_s) from None
            received += len(message.get("body", b""))
            if received > limit:
                raise UploadTooLargeError(None, max_upload)
            body_done = message.get("type") != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, receive_within_limits, send)
