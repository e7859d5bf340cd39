"""HTTP errors of milora-serve in OpenAI's shape, and the mapping of milora's typed errors.

Every error answer is {"error": {"message", "type", "param", "code"}} with a status that says
whose fault it was; no answer ever carries a traceback (those go to the server's log).
"""

from __future__ import annotations

from typing import Any

from milora.errors import (CapacityError, ManifestError, MiloraError, NumericalError, OverloadError, RequestError,
                           TenantError)
from milora.runtime.sampling import SamplingError


class ServeError(MiloraError):
    """milora-serve cannot start or be configured as asked (bad options, an unusable directory)."""


class ApiError(MiloraError):
    """An HTTP error answer: status, OpenAI error type, the offending parameter and a code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ReplicaLostError(MiloraError):
    """The process serving a request died (a Ray replica killed or crashed) and the request
    could not be retried transparently."""


class EngineFailure(MiloraError):
    """The engine's step raised an unexpected error; the requests it was running were failed."""


def not_ready(reason: str, retry_after: int = 1) -> ApiError:
    return ApiError(503, f"the server is not ready: {reason}; retry after {retry_after} s", "server_error",
                    code="not_ready", headers={"Retry-After": str(retry_after)})


def from_milora(exc: Exception, retry_after: int = 1) -> ApiError:
    """The HTTP answer for one of milora's typed errors raised while serving a request."""
    if isinstance(exc, ApiError):
        return exc
    msg = str(exc)
    retry = {"Retry-After": str(retry_after)}
    if isinstance(exc, OverloadError):
        return ApiError(429, msg, "rate_limit_error", code="overloaded", headers=retry)
    if isinstance(exc, TenantError):
        if msg.startswith("unknown tenant"):
            return ApiError(404, msg, "invalid_request_error", param="model", code="model_not_found")
        # Every adapter slot pinned or in use: a condition that clears by itself.
        return ApiError(503, msg, "server_error", param="model", code="no_free_adapter_slot", headers=retry)
    if isinstance(exc, CapacityError):
        return ApiError(400, msg, "invalid_request_error", param="max_tokens", code="context_length_exceeded")
    if isinstance(exc, SamplingError):
        param = msg.split("=", 1)[0] if "=" in msg.split(" ", 1)[0] else None
        return ApiError(400, msg, "invalid_request_error", param=param, code="invalid_sampling_parameter")
    if isinstance(exc, RequestError):
        return ApiError(400, msg, "invalid_request_error", code="invalid_request")
    if isinstance(exc, ManifestError) and "chat template" in msg:
        return ApiError(400, f"{msg} (use /v1/completions with a plain prompt)", "invalid_request_error",
                        param="messages", code="no_chat_template")
    if isinstance(exc, NumericalError):
        return ApiError(500, msg, "server_error", code="numerical_error")
    if isinstance(exc, ReplicaLostError):
        return ApiError(503, msg, "server_error", code="replica_lost", headers=retry)
    if isinstance(exc, EngineFailure):
        return ApiError(500, msg, "server_error", code="engine_failure")
    return ApiError(500, msg, "server_error", code=type(exc).__name__)

