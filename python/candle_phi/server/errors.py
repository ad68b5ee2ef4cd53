"""OpenAI's error JSON, and the statuses our exceptions map to."""

from __future__ import annotations

import re

from starlette.responses import JSONResponse

from candle_phi import CandlePhiError, ContextLengthError, InvalidArgumentError

# The engine's messages start "invalid <option>: ...": that option is OpenAI's `param`.
_OPTION = re.compile(r"invalid ([A-Za-z_]+)")


class APIError(Exception):
    """An error a client gets as ``{"error": {...}}`` with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def from_engine(error: CandlePhiError) -> APIError:
    """The client's view of an error the engine raised for its request."""
    if isinstance(error, ContextLengthError):
        return APIError(400, str(error), param="messages", code="context_length_exceeded")
    if isinstance(error, InvalidArgumentError):
        found = _OPTION.match(str(error))
        return APIError(400, str(error), param=found[1] if found else None, code="invalid_value")
    # Anything else is ours (a failed pass), not the client's: no details beyond the message.
    return APIError(500, f"the model failed: {error}", type="server_error")
