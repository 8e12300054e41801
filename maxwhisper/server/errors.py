"""Errors in the JSON OpenAI's API answers with: {"error": {message, type, param, code}}."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.type)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def api_error_handler(_request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def http_error_handler(_request: Request, exc) -> JSONResponse:
    """Starlette's own answers (no such route, wrong method) in the same shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None))


async def unexpected_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"internal server error: {type(exc).__name__}: {exc}", type="server_error")
