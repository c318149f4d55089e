"""Client input checks, pure: each failure names the field, and nothing is enqueued."""
from __future__ import annotations

import math
import re

from bros.v1 import inference_pb2, types_pb2

REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CHAT_ROLES = ("system", "user", "assistant")


class InvalidArgument(ValueError):
    def __init__(self, field: str, message: str, not_found: bool = False):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.not_found = not_found


def check_request_id(request_id: str, required: bool) -> None:
    if not request_id:
        if required:
            raise InvalidArgument("request_id", "must be set")
        return
    if not REQUEST_ID.match(request_id):
        raise InvalidArgument("request_id", "must be 1-128 characters of [A-Za-z0-9._:-]")


def check_generate(req: inference_pb2.GenerateRequest, max_prompt_chars: int, vocab_size: int) -> None:
    """Everything that can be checked before tokenizing."""
    check_request_id(req.request_id, required=False)
    if req.service_class not in (types_pb2.REALTIME, types_pb2.BEST_EFFORT):
        raise InvalidArgument("service_class", f"must be REALTIME or BEST_EFFORT, got {req.service_class}")
    which = req.WhichOneof("prompt")
    if which is None:
        raise InvalidArgument("prompt", "one of text, token_ids or chat must be set")
    if which == "text":
        if not req.text:
            raise InvalidArgument("text", "must not be empty")
        if len(req.text) > max_prompt_chars:
            raise InvalidArgument("text", f"{len(req.text)} characters exceed the limit of {max_prompt_chars}")
    elif which == "token_ids":
        if not req.token_ids.ids:
            raise InvalidArgument("token_ids.ids", "must not be empty")
        bad = next((t for t in req.token_ids.ids if t >= vocab_size), None)
        if bad is not None:
            raise InvalidArgument("token_ids.ids", f"token id {bad} outside the vocabulary [0, {vocab_size})")
    else:
        _check_chat(req.chat, max_prompt_chars)
    _check_sampling(req.sampling)
    if req.HasField("resume_from_index") and req.resume_from_index < -1:
        raise InvalidArgument("resume_from_index", "must be >= -1")


def _check_chat(chat, max_prompt_chars: int) -> None:
    if not chat.messages:
        raise InvalidArgument("chat.messages", "must not be empty")
    for i, m in enumerate(chat.messages):
        if m.role not in CHAT_ROLES:
            raise InvalidArgument(f"chat.messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}")
    if sum(len(m.content) for m in chat.messages) > max_prompt_chars:
        raise InvalidArgument("chat.messages", f"content exceeds the limit of {max_prompt_chars} characters")
    if not any(m.content for m in chat.messages):
        raise InvalidArgument("chat.messages", "all messages are empty")


def _check_sampling(s: types_pb2.SamplingParams) -> None:
    if s.max_tokens <= 0:
        raise InvalidArgument("sampling.max_tokens", "must be > 0")
    if s.HasField("temperature") and not (math.isfinite(s.temperature) and s.temperature >= 0):
        raise InvalidArgument("sampling.temperature", f"must be finite and >= 0, got {s.temperature}")
    if s.HasField("top_p") and not (0 < s.top_p <= 1):
        raise InvalidArgument("sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    if any(not stop for stop in s.stop):
        raise InvalidArgument("sampling.stop", "must not contain empty strings")


def check_length(num_prompt_tokens: int, max_tokens: int, max_model_len: int) -> None:
    """After tokenizing: the prompt and all requested tokens must fit the context."""
    if num_prompt_tokens + max_tokens > max_model_len:
        raise InvalidArgument("sampling.max_tokens", f"prompt ({num_prompt_tokens} tokens) + max_tokens "
                                                     f"({max_tokens}) exceed the model's context of {max_model_len}")
