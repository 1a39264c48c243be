"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP
status a client of that API expects for each."""

from __future__ import annotations

import json

from aiohttp import web


class ApiError(Exception):
    """An answer other than success; `response()` is what the client gets."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(self.retry_after_s)
        return web.Response(
            status=self.status,
            text=json.dumps(self.body()),
            content_type="application/json",
            headers=headers,
        )


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key")


def model_not_found(model: str, served: list[str]) -> ApiError:
    return ApiError(
        404,
        f"the model {model!r} does not exist here; this daemon serves {', '.join(served)}",
        param="model",
        code="model_not_found",
    )


def busy(retry_after_s: int) -> ApiError:
    return ApiError(
        429,
        "every generation slot of this daemon is taken and the wait for one ran out; "
        f"retry in {retry_after_s} s",
        kind="rate_limit_error",
        code="rate_limit_exceeded",
        retry_after_s=retry_after_s,
    )


def no_route(message: str) -> ApiError:
    return ApiError(503, message, kind="server_error", code="no_route", retry_after_s=10)
