"""Client input checks, pure: each failure names the field, and nothing is enqueued.

max_model_len is the smallest any worker reports: the model's context, or its KV pool
if that is smaller (a longer sequence could never finish there).

Every size a client controls has a limit here (the SchedulerConfig fields named max_*);
what only the transport can see is bounded by gRPC itself: a message over the server's
max receive size, or metadata over 16 KiB, ends with RESOURCE_EXHAUSTED before any of
this runs.
"""
from __future__ import annotations

import math
import re
from typing import Protocol

from bros.v1 import inference_pb2, types_pb2

REQUEST_ID_CHARS = re.compile(r"[A-Za-z0-9._:-]+")
CHAT_ROLES = ("system", "user", "assistant")


class Limits(Protocol):
    """The request limits, as SchedulerConfig carries them."""
    max_prompt_chars: int
    max_chat_messages: int
    max_stop_strings: int
    max_stop_string_chars: int
    max_stop_token_ids: int
    max_request_id_chars: int


class InvalidArgument(ValueError):
    def __init__(self, field: str, message: str, not_found: bool = False):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.not_found = not_found


def check_request_id(request_id: str, required: bool, max_chars: int = 128) -> None:
    if not request_id:
        if required:
            raise InvalidArgument("request_id", "must be set")
        return
    # fullmatch: re's `$` would also accept a trailing newline.
    if len(request_id) > max_chars or not REQUEST_ID_CHARS.fullmatch(request_id):
        raise InvalidArgument("request_id", f"must be 1-{max_chars} characters of [A-Za-z0-9._:-]")


def check_resume_index(request) -> None:
    if request.HasField("resume_from_index") and request.resume_from_index < -1:
        raise InvalidArgument("resume_from_index", f"must be >= -1, got {request.resume_from_index}")


def check_lookup(request, limits: Limits) -> None:
    """A request that names an existing request: WatchRequest, AbortRequest."""
    check_request_id(request.request_id, True, limits.max_request_id_chars)
    if "resume_from_index" in request.DESCRIPTOR.fields_by_name:
        check_resume_index(request)


def check_generate(req: inference_pb2.GenerateRequest, limits: Limits, vocab_size: int,
                   max_model_len: int) -> None:
    """Everything that can be checked before tokenizing."""
    check_request_id(req.request_id, False, limits.max_request_id_chars)
    if req.service_class not in (types_pb2.REALTIME, types_pb2.BEST_EFFORT):
        raise InvalidArgument("service_class", f"must be REALTIME or BEST_EFFORT, got {req.service_class}")
    which = req.WhichOneof("prompt")
    if which is None:
        raise InvalidArgument("prompt", "one of text, token_ids or chat must be set")
    if which == "text":
        if not req.text:
            raise InvalidArgument("text", "must not be empty")
        if len(req.text) > limits.max_prompt_chars:
            raise InvalidArgument("text", f"{len(req.text)} characters exceed the limit of {limits.max_prompt_chars}")
    elif which == "token_ids":
        _check_token_ids(req.token_ids.ids, vocab_size, max_model_len)
    else:
        _check_chat(req.chat, limits)
    _check_sampling(req.sampling, limits, vocab_size, max_model_len)
    check_resume_index(req)


def _check_token_ids(ids, vocab_size: int, max_model_len: int) -> None:
    if not ids:
        raise InvalidArgument("token_ids.ids", "must not be empty")
    if len(ids) >= max_model_len:
        raise InvalidArgument("token_ids.ids", f"{len(ids)} tokens leave no room for output in "
                                               f"max_model_len {max_model_len}")
    bad = next((t for t in ids if t >= vocab_size), None)
    if bad is not None:
        raise InvalidArgument("token_ids.ids", f"token id {bad} outside the vocabulary [0, {vocab_size})")


def _check_chat(chat, limits: Limits) -> None:
    if not chat.messages:
        raise InvalidArgument("chat.messages", "must not be empty")
    if len(chat.messages) > limits.max_chat_messages:
        raise InvalidArgument("chat.messages", f"{len(chat.messages)} messages exceed the limit of "
                                               f"{limits.max_chat_messages}")
    for i, m in enumerate(chat.messages):
        if m.role not in CHAT_ROLES:
            raise InvalidArgument(f"chat.messages[{i}].role",
                                  f"must be one of {', '.join(CHAT_ROLES)}, got {m.role[:32]!r}")
    if sum(len(m.content) for m in chat.messages) > limits.max_prompt_chars:
        raise InvalidArgument("chat.messages", f"content exceeds the limit of {limits.max_prompt_chars} characters")
    if not any(m.content for m in chat.messages):
        raise InvalidArgument("chat.messages", "all messages are empty")


def _check_sampling(s: types_pb2.SamplingParams, limits: Limits, vocab_size: int, max_model_len: int) -> None:
    if s.max_tokens <= 0:
        raise InvalidArgument("sampling.max_tokens", "must be > 0")
    if s.max_tokens >= max_model_len:
        raise InvalidArgument("sampling.max_tokens", f"{s.max_tokens} leaves no room for a prompt in "
                                                     f"max_model_len {max_model_len}")
    if s.HasField("temperature") and not (math.isfinite(s.temperature) and s.temperature >= 0):
        raise InvalidArgument("sampling.temperature", f"must be finite and >= 0, got {s.temperature}")
    if s.HasField("top_p") and not (0 < s.top_p <= 1):
        raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    if len(s.stop_token_ids) > limits.max_stop_token_ids:
        raise InvalidArgument("sampling.stop_token_ids", f"{len(s.stop_token_ids)} ids exceed the limit of "
                                                         f"{limits.max_stop_token_ids}")
    bad = next((t for t in s.stop_token_ids if t >= vocab_size), None)
    if bad is not None:
        raise InvalidArgument("sampling.stop_token_ids", f"token id {bad} outside the vocabulary [0, {vocab_size})")
    if len(s.stop) > limits.max_stop_strings:
        raise InvalidArgument("sampling.stop", f"{len(s.stop)} stop strings exceed the limit of "
                                               f"{limits.max_stop_strings}")
    if any(not stop for stop in s.stop):
        raise InvalidArgument("sampling.stop", "must not contain empty strings")
    longest = max(map(len, s.stop), default=0)
    if longest > limits.max_stop_string_chars:
        raise InvalidArgument("sampling.stop", f"a stop string of {longest} characters exceeds the limit of "
                                               f"{limits.max_stop_string_chars}")


def check_length(num_prompt_tokens: int, max_tokens: int, max_model_len: int, prompt_field: str = "prompt",
                 limit_name: str = "max_model_len") -> None:
    """After tokenizing: the prompt and all requested tokens must fit the context (or
    limit_name's smaller limit)."""
    if num_prompt_tokens >= max_model_len:
        raise InvalidArgument(prompt_field, f"the prompt's {num_prompt_tokens} tokens leave no room for output in "
                                            f"{limit_name} {max_model_len}")
    if num_prompt_tokens + max_tokens > max_model_len:
        raise InvalidArgument("sampling.max_tokens", f"prompt ({num_prompt_tokens} tokens) + max_tokens "
                                                     f"({max_tokens}) exceed {limit_name} {max_model_len}")
