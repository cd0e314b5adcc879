"""OpenAI-style error responses: every non-2xx answer of the server carries ``{"error": {...}}``.

``APIError`` is raised at the boundary where a bad value enters (body parsing, model lookup, admission); the app's
exception handler turns it into the JSON body. Validation failures are 400 (not FastAPI's 422) and name the field.
"""

from __future__ import annotations

from pydantic import ValidationError
from starlette.responses import JSONResponse

from nanoflow.serve.protocol import ErrorDetail, ErrorResponse, param_of


class APIError(Exception):
    """An error answer: HTTP ``status`` plus the OpenAI error fields."""

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
        self.headers = headers

    @property
    def detail(self) -> ErrorDetail:
        return ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(ErrorResponse(error=self.detail).model_dump(), self.status, headers=self.headers)


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    """A 400 ``invalid_request_error``."""
    return APIError(400, message, param=param, code=code)


def from_validation_error(err: ValidationError) -> APIError:
    """The first validation failure as a 400 naming its field, e.g. ``temperature: Input should be <= 2 (got 5)``."""
    errors = err.errors(include_url=False)
    first = errors[0]
    param = param_of(tuple(first["loc"])) or None
    msg = first["msg"].removeprefix("Value error, ")
    got = "" if first["type"] == "missing" else f" (got {_short(first.get('input'))})"
    more = f"; and {len(errors) - 1} more error(s)" if len(errors) > 1 else ""
    text = f"{param}: {msg}{got}{more}" if param else f"{msg}{got}{more}"
    code = "missing_field" if first["type"] == "missing" else "invalid_value"
    return APIError(400, text, param=param, code=code)


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
