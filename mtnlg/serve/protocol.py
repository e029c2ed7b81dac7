"""OpenAI request checking and response shapes (legacy completions with ``echo`` and ``logprobs``, chat
completions). A bad field raises ``ApiError`` (status, message, param), which the app answers as OpenAI does:
``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from dataclasses import dataclass

from mtnlg.serve.engine import Params
from mtnlg.serve.model_runner import ModelInfo

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOPS = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_exceeded", 503: "server_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Prompt:
    ids: list[int]
    text: str


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, param, "invalid_value")


def _number(body: dict, key: str, default, lo=None, hi=None, integer: bool = False, lo_open: bool = False):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise _bad(f"'{key}' must be {'an integer' if integer else 'a number'}, got {v!r}", key)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise _bad(f"'{key}' must be {'>' if lo_open else '>='} {lo}, got {v}", key)
    if hi is not None and v > hi:
        raise _bad(f"'{key}' must be <= {hi}, got {v}", key)
    return v


def _flag(body: dict, key: str) -> bool:
    v = body.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(f"'{key}' must be true or false, got {v!r}", key)
    return v


def check_model(body: dict, info: ModelInfo) -> None:
    model = body.get("model")
    if model is not None and model != info.name:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{info.name}'", "model",
                       "model_not_found")


def params(body: dict, info: ModelInfo, prompt_len: int, default_max_tokens: int | None, max_batch_tokens: int,
           max_n: int) -> tuple[Params, int]:
    """The sampling parameters and ``n`` of a request whose longest prompt has ``prompt_len`` tokens."""
    room = info.context - prompt_len
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {info.context} tokens; the prompt has "
                       f"{prompt_len}. Shorten the prompt.", "prompt", "context_length_exceeded")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, default_max_tokens or room, lo=1, integer=True)
    if prompt_len + max_tokens > info.context:
        raise ApiError(400, f"This model's maximum context length is {info.context} tokens; the prompt "
                       f"({prompt_len}) plus {key} ({max_tokens}) exceeds it. Ask for fewer tokens.", key,
                       "context_length_exceeded")
    if prompt_len + max_tokens > max_batch_tokens:
        raise ApiError(400, f"prompt ({prompt_len}) plus {key} ({max_tokens}) exceeds the server's KV budget "
                       f"of {max_batch_tokens} tokens (--max-batch-tokens)", key, "context_length_exceeded")
    n = _number(body, "n", 1, lo=1, hi=max_n, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise _bad(f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", "stop")
    top_k = _number(body, "top_k", 0, lo=-1, integer=True)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        logprobs = _number(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS, integer=True)
    seed = _number(body, "seed", None, integer=True)
    p = Params(max_tokens=max_tokens, temperature=float(_number(body, "temperature", 1.0, lo=0, hi=2)),
               top_p=float(_number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True)), top_k=max(top_k, 0),
               seed=seed, stop=stop, logprobs=logprobs, echo=_flag(body, "echo"),
               ignore_eos=_flag(body, "ignore_eos"))
    _flag(body, "stream")
    return p, n


def prompts(body: dict, info: ModelInfo) -> list[Prompt]:
    """``prompt`` as a string, a list of strings, a list of token ids, or a list of lists of token ids."""
    p = body.get("prompt")
    if isinstance(p, str):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        items = p
    else:
        raise _bad("'prompt' must be a string, a list of strings, or token ids (a list of integers, or a list of "
                   "such lists)", "prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            ids = info.encode(item)
            text = item
        else:
            if not item or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < info.vocab_size
                                   for t in item):
                raise _bad(f"token ids must be integers in [0, {info.vocab_size})", "prompt")
            ids, text = list(item), info.decode(list(item))
        if not ids:
            ids = [info.eod_id]  # an empty prompt conditions on a document boundary
        out.append(Prompt(ids, text))
    return out


def chat_prompt(body: dict, info: ModelInfo) -> Prompt:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise _bad("'messages' must be a non-empty list of {\"role\": ..., \"content\": \"...\"}", "messages")
    if info.chat_template is None:
        raise ApiError(400, f"the tokenizer of '{info.name}' has no chat template; use /v1/completions", "messages")
    if _flag(body, "logprobs"):
        raise _bad("logprobs on chat completions is not supported here; use /v1/completions with logprobs",
                   "logprobs")
    text = info.chat_template([{"role": m["role"], "content": m["content"]} for m in messages])
    return Prompt(info.encode(text) or [info.eod_id], text)


def logprobs_block(info: ModelInfo, entries: list[dict | None], tokens: list[int], text_start: int) -> dict:
    """The legacy completions ``logprobs`` object for ``tokens`` with their per-token ``entries``."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = text_start
    for token, e in zip(tokens, entries):
        piece = info.decode([token])
        out["tokens"].append(piece)
        out["token_logprobs"].append(None if e is None else e["logprob"])
        out["top_logprobs"].append(None if e is None else {info.decode([t]): v for t, v in e["top"].items()})
        out["text_offset"].append(offset)
        offset += len(piece)
    return out
