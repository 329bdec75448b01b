"""Errors of `gill serve` as OpenAI's error JSON: `{"error": {"message", "type", "param", "code"}}` with a status.

Every refusal is one line that names the field and shows the value; no traceback ever reaches a client (the
server logs unexpected ones and answers 500 with one line).
"""

import json

# Status -> OpenAI's error `type`.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ApiError(Exception):
    """A request refused with `status`; `param` names the field at fault (OpenAI's `param`), `code` a short tag."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, one_line(message), param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def bad_request(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": one_line(message), "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def one_line(text) -> str:
    return " ".join(str(text).split())


def show(value, limit: int = 80) -> str:
    """A client's value as an error message shows it: JSON, cut to `limit` characters."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
