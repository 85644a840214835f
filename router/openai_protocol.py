"""The OpenAI request and response shapes the HTTP API speaks, and their translation.

Where it sits: ``http_api.py`` parses a request body into one of these models
(pydantic, unknown fields refused), ``to_generate_request`` turns it into the
``GenerateRequest`` the gRPC servicer validates — so both APIs share one validation
path — and the ``*_response`` / ``*_chunk`` builders turn the servicer's ``Piece``s
back into OpenAI JSON. Field names and defaults follow OpenAI's API reference
(``temperature`` defaults to 1, ``max_tokens`` of a completion to 16); SpecFleet's
own controls and statistics are extra fields, documented in docs/api.md:

- request: ``top_k``, ``speculation`` {``disable``, ``max_draft_length``, ``drafter``},
  ``return_token_ids``;
- response: ``speculation`` (the request's speculation statistics), ``seed`` (of a
  sampled request: send it back to reproduce the output) and, when asked,
  ``choices[0].token_ids``.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from specfleet.core.stats import RequestStats
from specfleet.core.types import FinishReason
from specfleet.proto import specfleet_pb2 as pb

INT32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]  # the proto's field width
SEED = Annotated[int, Field(ge=0, le=2**64 - 1)]


class OpenAIError(Exception):
    """A request answered with OpenAI's error JSON (``http_api`` renders it)."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


# ---- requests -----------------------------------------------------------------------------------
class _Strict(BaseModel):
    # OpenAI answers an unknown argument with 400; silently ignoring one (a typo in
    # "max_tokens", a feature we lack) would return something the client did not ask for.
    model_config = ConfigDict(extra="forbid")


class SpeculationControls(_Strict):
    """SpecFleet's per-request speculation controls (the gRPC ``SpeculationOptions``)."""

    disable: bool = False  # plain autoregressive decoding (same output, no drafter)
    max_draft_length: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None
    drafter: str | None = None  # a drafter by name (GET /v1/models lists them); none = routed


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """What completions and chat requests share."""

    model: str
    temperature: float | None = None  # OpenAI's default is 1 (sampled); 0 = greedy
    top_p: float | None = None
    top_k: INT32 | None = None  # extension (as vLLM); 0 = off
    seed: SEED | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted for compatibility; not used
    speculation: SpeculationControls | None = None
    return_token_ids: bool = False

    def check_supported(self) -> None:
        """Standard arguments SpecFleet accepts only at their no-op values."""
        if self.n != 1:
            raise bad_request("n: only 1 choice per request is supported", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise bad_request(f"{name}: penalties are not supported (they would change "
                                  "the target's distribution); send 0", name)
        if self.logit_bias:
            raise bad_request("logit_bias: not supported", "logit_bias")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options: only allowed with stream=true", "stream_options")


class CompletionRequest(_Sampling):
    prompt: str | list[INT32] | list[str] | list[list[INT32]]
    max_tokens: INT32 | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise bad_request("echo: not supported", "echo")
        if self.logprobs is not None:
            raise bad_request("logprobs: not supported", "logprobs")
        if self.best_of not in (None, 1):
            raise bad_request("best_of: only 1 is supported", "best_of")
        if self.suffix is not None:
            raise bad_request("suffix: not supported", "suffix")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: INT32 | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: INT32 | None = None
    logprobs: bool = False

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs:
            raise bad_request("logprobs: not supported", "logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise bad_request("max_tokens: set max_completion_tokens or max_tokens, not both",
                              "max_tokens")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request (a batch of one is accepted)."""
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request("prompt: batches are not supported; send one prompt per request",
                              "prompt")
        prompt = prompt[0]
    return prompt


def to_generate_request(req: _Sampling, prompt: str | list[int], max_tokens: int | None,
                        request_id: str) -> pb.GenerateRequest:
    """The gRPC request an OpenAI request means; the servicer validates it (``prepare``)."""
    msg = pb.GenerateRequest(request_id=request_id)
    if isinstance(prompt, str):
        msg.text = prompt
    else:
        msg.token_ids.ids.extend(prompt)
    s = msg.sampling
    s.temperature = 1.0 if req.temperature is None else req.temperature
    if req.top_p is not None:
        s.top_p = req.top_p
    if req.top_k is not None:
        s.top_k = req.top_k
    if req.seed is not None:
        s.seed = req.seed
    if max_tokens is not None:
        s.max_new_tokens = max_tokens
    if req.stop is not None:
        s.stop.extend([req.stop] if isinstance(req.stop, str) else req.stop)
    spec = req.speculation
    if spec is not None:
        msg.speculation.disable = spec.disable
        if spec.max_draft_length is not None:
            msg.speculation.max_draft_length = spec.max_draft_length
        if spec.drafter is not None:
            msg.speculation.drafter = spec.drafter
    return msg


# The servicer names fields by their gRPC path; an OpenAI client knows them by these names.
_PARAMS = {
    "sampling.max_new_tokens": "max_tokens",
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.top_k": "top_k",
    "sampling.stop": "stop",
    "sampling.seed": "seed",
    "speculation.drafter": "speculation.drafter",
    "speculation.max_draft_length": "speculation.max_draft_length",
    "prompt.token_ids": "prompt",
    "prompt.text": "prompt",
    "prompt": "prompt",
    "request_id": None,
}


def translate_invalid(message: str, *, prompt_param: str = "prompt",
                      max_tokens_param: str = "max_tokens") -> OpenAIError:
    """A servicer INVALID_ARGUMENT message as OpenAI's 400, its field renamed."""
    field, sep, rest = message.partition(":")
    if sep and field in _PARAMS:
        param = _PARAMS[field]
        if param == "prompt":
            param = prompt_param
        elif param == "max_tokens":
            param = max_tokens_param
        return bad_request(f"{param}:{rest}" if param else message, param)
    return bad_request(message)


# ---- responses ----------------------------------------------------------------------------------
_FINISH = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop"}


def finish_reason(reason: FinishReason | None) -> str | None:
    return None if reason is None else _FINISH.get(reason, "stop")


def speculation_stats(stats: RequestStats | None) -> dict[str, Any] | None:
    """A request's speculation statistics as the ``speculation`` extra field."""
    if stats is None:
        return None
    return {
        "rounds": stats.rounds,
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "emitted": stats.emitted,
        "mean_acceptance_length": stats.mean_acceptance_length,
        "acceptance_rate": stats.acceptance_rate,
        "position_drafted": list(stats.position_drafted),
        "position_accepted": list(stats.position_accepted),
        "drafters": dict(stats.drafters),
        "domain": stats.domain,
        "verifier_group": stats.verifier_group,
        "queue_ns": stats.queue_ns,
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, request_id: str, model: str, created: int, choices: list[dict]) -> dict:
    return {"id": request_id, "object": kind, "created": created, "model": model,
            "choices": choices}


def now_s() -> int:
    return int(time.time())
