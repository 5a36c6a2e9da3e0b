"""Errors that the engine raises to its callers."""


class EngineError(Exception):
    pass


class InvalidRequestError(EngineError):
    """The request can never run: bad sampling parameters, prompt too long, unknown token ids."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class WaitingQueueFullError(EngineError):
    """The waiting queue already contains max_waiting requests; retry later or on another worker."""


class EngineStoppedError(EngineError):
    """The engine is stopped or stopping and accepts no requests."""


class RequestFailedError(EngineError):
    """A model step failed while the request was in the batch."""
