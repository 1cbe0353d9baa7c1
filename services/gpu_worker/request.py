"""What goes into the engine (a request with its sampling parameters) and what comes out."""

from __future__ import annotations

from dataclasses import dataclass, field

FINISH_REASONS = ("stop", "length", "error", "cancelled")


class RequestError(ValueError):
    """A request is invalid (bad parameter, unknown adapter, prompt too long...)."""


class UnknownAdapterRequestError(RequestError):
    """The request names an adapter the engine does not serve."""


class DuplicateRequestError(RequestError):
    """A request with this id is already in the engine."""


@dataclass
class SamplingParams:
    """Per-request generation parameters (OpenAI/vLLM semantics)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= float(self.temperature) <= 100.0:
            raise RequestError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise RequestError(f"top_k must be -1, 0 or a positive integer, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise RequestError(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("stop must be a list of non-empty strings")


@dataclass
class EngineRequest:
    """One generation request as the engine sees it (already tokenized).

    ``resumed_tokens``: how many trailing ``prompt_token_ids`` another engine already generated
    and streamed (a request re-routed after a worker loss). Their text is not emitted again,
    but detokenizing and stop matching continue from them as if nothing had happened.
    """

    request_id: str
    prompt_token_ids: list[int]
    adapter: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    resumed_tokens: int = 0


@dataclass
class PrefillLora:
    """How a request's (last, successful) prefill got its LoRA deltas.

    ``cpu_layers``: layers whose deltas the CPU prefill pool computed; ``device_layers``: layers
    computed on the device; ``waited_ms``: time it waited for its adapter before that prefill;
    ``fallback``: why an assisted attempt fell back to waiting (None if none did).
    """

    cpu_layers: int = 0
    device_layers: int = 0
    waited_ms: float = 0.0
    fallback: str | None = None


@dataclass
class RequestOutput:
    """What one engine step produced for one request.

    ``new_token_ids`` are the tokens generated in this step (usually one);
    ``text_delta`` is the newly detokenized text. A finished output carries
    ``finish_reason`` in FINISH_REASONS and the final usage counts.
    """

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token: bool = False  # True for the output carrying the first generated token
    logits: object | None = None  # float32 [vocab] tensor when the engine records logits
    scheduled_at: float | None = None  # wall time its prefill was first scheduled (first-token output only)
    prefill_lora: PrefillLora | None = None  # how its prefill got its LoRA deltas (first-token output only)
