"""OpenAI-style request bodies (validated with pydantic) and the response objects built from
the runtime's Deltas: chat.completion(.chunk), text_completion, usage, logprobs.

Fields follow OpenAI's API; a few vLLM-style extensions are accepted (top_k,
repetition_penalty, ignore_eos). Fields OpenAI defines that milora does not implement are
refused with a 400 naming the field, never silently ignored (except `user`, `metadata` and
`store`, which do not change the answer).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from milora.runtime.sampling import MAX_LOGPROBS
from milora.serve.driver import Delta, GenerateCall
from milora.serve.errors import ApiError

MAX_STOP = 8
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    model_config = ConfigDict(extra="ignore", strict=True)  # e.g. "name" does not change the prompt
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def as_template_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(None, ge=0, lt=2 ** 63)
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    # Extensions (as in vLLM): not in OpenAI's API.
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    ignore_eos: bool = False

    def _check_common(self, max_tokens_limit: int) -> None:
        if self.n not in (None, 1):
            raise ApiError(400, f"n={self.n} is not supported: milora-serve returns one choice per request; "
                           "send n separate requests (with different seeds) instead", param="n",
                           code="unsupported_parameter")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ApiError(400, f"{name}={getattr(self, name)} is not supported; use repetition_penalty "
                               "(> 1 discourages repeats) or leave it at 0", param=name, code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ApiError(400, f"stop holds {len(stops)} sequence(s) {stops!r:.80}; expected at most {MAX_STOP} "
                           "non-empty strings", param="stop")
        limit = self._max_tokens()
        if limit is not None and limit > max_tokens_limit:
            raise ApiError(400, f"max_tokens={limit} exceeds this server's limit of {max_tokens_limit}; ask for "
                           "fewer tokens (or start the server with a larger --max-tokens-limit)", param="max_tokens",
                           code="max_tokens_too_large")

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def _sampling(self, logprobs: int | None) -> dict[str, Any]:
        out: dict[str, Any] = {"temperature": 1.0 if self.temperature is None else float(self.temperature),
                               "ignore_eos": self.ignore_eos}
        if self.top_p is not None:
            out["top_p"] = float(self.top_p)
        if self.seed is not None:
            out["seed"] = self.seed
        if self.stop:
            out["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if self.top_k is not None:
            out["top_k"] = self.top_k
        if self.repetition_penalty is not None:
            out["repetition_penalty"] = float(self.repetition_penalty)
        if logprobs is not None:
            out["logprobs"] = logprobs
        return out


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def _max_tokens(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ApiError(400, f"max_tokens={self.max_tokens} and max_completion_tokens="
                           f"{self.max_completion_tokens} disagree; give one of them", param="max_completion_tokens")
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_call(self, tenant: str | None, max_tokens_limit: int) -> GenerateCall:
        self._check_common(max_tokens_limit)
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        lp = (self.top_logprobs or 0) if self.logprobs else None
        return GenerateCall(tenant, messages=[m.as_template_message() for m in self.messages],
                            max_tokens=self._max_tokens(), sampling=self._sampling(lp))


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def to_call(self, tenant: str | None, max_tokens_limit: int) -> GenerateCall:
        self._check_common(max_tokens_limit)
        for name, bad in (("echo", self.echo), ("suffix", self.suffix is not None),
                          ("best_of", self.best_of not in (None, 1))):
            if bad:
                raise ApiError(400, f"{name} is not supported by milora-serve; leave it out", param=name,
                               code="unsupported_parameter")
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ApiError(400, f"prompt holds {len(p)} prompts; milora-serve takes one prompt per request "
                               "(send one request each)", param="prompt", code="unsupported_parameter")
            p = p[0]
        if isinstance(p, list) and not p:
            raise ApiError(400, "prompt is empty; give text or at least one token id", param="prompt")
        call = GenerateCall(tenant, max_tokens=self.max_tokens, sampling=self._sampling(self.logprobs))
        if isinstance(p, str):
            call.prompt = p
        else:
            call.prompt_ids = list(p)
        return call


def parse(model: type[BaseModel], raw: bytes) -> Any:
    """A request body as `model`, or a 400 naming the first bad field and what was expected."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = ".".join(str(x) for x in err["loc"]) or None
        if err["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON ({err['msg']})", code="invalid_json") from None
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown or unsupported field {loc!r}; see docs/serving.md for the fields "
                           "milora-serve accepts", param=loc, code="unsupported_parameter") from None
        seen = "" if err["type"] == "missing" else f" (got {err.get('input')!r:.60})"
        raise ApiError(400, f"{loc}: {err['msg']}{seen}", param=loc, code=err["type"]) from None


# ---- responses ----

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(delta: Delta) -> str:
    return FINISH.get(delta.finish_reason or "", "stop")


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    def item(tok: str, lp: float) -> dict[str, Any]:
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8"))}
    return {"content": [{**item(e["token"], e["logprob"]), "top_logprobs": [item(t, v) for t, _, v in e["top"]]}
                        for e in entries], "refusal": None}


def completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    offsets, pos = [], offset
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t: v for t, _, v in e["top"]} for e in entries], "text_offset": offsets}


class ResponseBuilder:
    """The response objects of one request (chat or text completion)."""

    def __init__(self, kind: Literal["chat", "completion"], model: str, want_logprobs: bool):
        self.kind, self.model, self.want_logprobs = kind, model, want_logprobs
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())
        self._chars = 0

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def final(self, text: str, logprobs: list[dict[str, Any]], last: Delta, prompt_tokens: int) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": chat_logprobs(logprobs) if self.want_logprobs else None,
                      "finish_reason": finish_reason(last)}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": completion_logprobs(logprobs, 0) if self.want_logprobs
                      else None, "finish_reason": finish_reason(last)}
            obj = "text_completion"
        return {**self._head(obj), "choices": [choice], "usage": usage(prompt_tokens, last.tokens)}

    def chunk(self, delta: Delta | None, first: bool = False) -> dict[str, Any]:
        """A stream chunk for this delta (first=True: the chat role chunk, before any token)."""
        fr = finish_reason(delta) if delta is not None and delta.done else None
        if self.kind == "chat":
            d: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if delta is not None and delta.text:
                d["content"] = delta.text
            lp = chat_logprobs(delta.logprobs) if self.want_logprobs and delta is not None and delta.logprobs else None
            return {**self._head("chat.completion.chunk"),
                    "choices": [{"index": 0, "delta": d, "logprobs": lp, "finish_reason": fr}]}
        text = delta.text if delta is not None else ""
        lp = None
        if self.want_logprobs and delta is not None and delta.logprobs:
            lp = completion_logprobs(delta.logprobs, self._chars)
        self._chars += len(text)
        return {**self._head("text_completion"),
                "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": fr}]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
