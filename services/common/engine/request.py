"""Request bookkeeping shared by every model runner."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from services.common.engine.detokenizer import IncrementalDetokenizer


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    # The model produced its end-of-sequence token.
    STOP = "stop"
    # The completion reached max_tokens or the context length.
    LENGTH = "length"
    # The completion produced one of the request's stop strings.
    STOP_STRING = "stop_string"
    # The caller aborted the request.
    CANCELLED = "cancelled"
    # The model step failed; the output's error field gives the reason.
    ERROR = "error"


MAX_STOP_STRINGS = 4
MAX_STOP_STRING_BYTES = 64


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    # 0 selects greedy decoding.
    temperature: float = 0.0
    # Nucleus sampling mass in (0, 1]; 1 keeps every token.
    top_p: float = 1.0
    # None picks a random seed when the request is added.
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for stop in self.stop:
            if not stop or len(stop.encode()) > MAX_STOP_STRING_BYTES:
                raise ValueError(f"each stop string must have 1 to {MAX_STOP_STRING_BYTES} bytes, got {stop!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class RequestOutput:
    """Output of one step for one request."""

    request_id: str
    # Token ids decoded in this step.
    token_ids: tuple[int, ...]
    # Text that became final in this step; never ends inside a UTF-8
    # character and never contains any part of a stop string.
    text: str
    num_prompt_tokens: int
    num_completion_tokens: int
    finish_reason: FinishReason | None = None
    # Set with FinishReason.ERROR.
    error: str | None = None
    # With FinishReason.ERROR: the engine stopped, so another worker can run the request.
    engine_stopped: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Request:
    request_id: str
    tenant_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    # The seed the sampler uses: sampling.seed, or a random one.
    seed: int
    detokenizer: IncrementalDetokenizer
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    block_table: list[int] = field(default_factory=list)
    # Tokens whose keys and values are in the KV cache.
    num_computed_tokens: int = 0
    # Prompt tokens whose keys and values came from the prefix cache.
    num_cached_tokens: int = 0
    # Prefix cache hashes of the full prompt blocks, computed at the first admission attempt.
    block_hashes: list[bytes] | None = None
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def uncomputed_token_ids(self) -> list[int]:
        """Token ids not yet in the KV cache: the prompt, then the last output token."""
        if self.num_computed_tokens < self.num_prompt_tokens:
            return self.prompt_token_ids[self.num_computed_tokens :]
        return self.output_token_ids[self.num_computed_tokens - self.num_prompt_tokens :]
