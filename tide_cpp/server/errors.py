"""Errors as OpenAI's API returns them, so clients (the `openai` package, Open WebUI) show the
message: {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}."""


class APIError(Exception):
    """An error answered to the client with `status` and OpenAI's error body."""

    def __init__(self, status, message, type="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status = int(status)
        self.message = str(message)
        self.type = type
        self.param = param
        self.code = code

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def invalid(param, message):
    """400 for one request field; the message names the field."""
    return APIError(400, f"{param}: {message}" if param else message, param=param,
                    code="invalid_value")


def unauthorized():
    return APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                    type="authentication_error", code="invalid_api_key")


def overloaded(message):
    return APIError(503, message, type="server_error", code="overloaded")


# A whole 32768-token conversation is about 1 MiB of JSON even when every character is escaped;
# 32 MiB leaves room for any real request and none for one meant to exhaust the memory.
MAX_BODY_BYTES = 32 << 20


def too_large(size, limit):
    """413 for a request body over --max-request-bytes (size: the bytes seen when it went over)."""
    return APIError(413, f"request body: {size} bytes or more, over the server's limit of {limit} "
                         f"bytes (tide-cli serve --max-request-bytes)", code="request_too_large")
