"""Every failure as an OpenAI-style error object ``{"error": {"message", "type", "param", "code"}}``.

Clients written for OpenAI read ``error.message``; the status codes follow OpenAI's: 400 bad
request, 401 key, 404 unknown model or path, 413 body too large, 429 busy.
"""

from __future__ import annotations

from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..service import BackendError, BusyError
from .schemas import ErrorBody, ErrorResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_exceeded", 500: "api_error"}


class APIError(Exception):
    """Raised by a route; becomes the error object and status below."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                   headers: Optional[dict] = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=_TYPES.get(status, "api_error"), param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def from_backend(err: BackendError) -> APIError:
    """A backend refusal: busy is 429 (retry later), anything else the client's request to fix (400)."""
    if isinstance(err, BusyError):
        return APIError(429, str(err) or "the server is busy; try again shortly.", code="server_busy")
    return APIError(400, str(err))


def _validation_message(err: RequestValidationError) -> tuple[str, Optional[str]]:
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid" or not loc:
        return "the request body is not a JSON object; send one (Content-Type: application/json).", None
    param = ".".join(loc) or None
    where = f"'{param}': " if param else ""
    return f"{where}{first.get('msg', 'invalid value')}.", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        headers = {"Retry-After": "1"} if err.status == 429 else None
        return error_response(err.status, err.message, err.param, err.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        message, param = _validation_message(err)
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception):  # ours, not the client's: uvicorn logs its traceback
        return error_response(500, f"the server failed ({type(err).__name__}: {err}); the server's log has the details.",
                              code="internal_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        return error_response(err.status_code, str(err.detail), headers=getattr(err, "headers", None))


class BodySizeLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before the app sees it (by its
    Content-Length, or counted while a chunked body streams in: no more than the limit is held)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        received: list[Message] = []
        size = 0
        while True:
            message = await receive()
            received.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay() -> Message:  # the body as read, then the live channel (disconnects)
            return received.pop(0) if received else await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"the request body is over the server's limit of {self.max_bytes} bytes; "
                                  "send a shorter conversation.", code="request_too_large")
        await response(scope, receive, send)
