"""Text <-> token ids for a Hugging Face checkpoint directory, chat templates, streaming decode.

Built on `tokenizers` (tokenizer.json) and a sandboxed jinja2 render of the chat template, so
serving does not import transformers.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _Backend

_INCOMPLETE = "\ufffd"  # what decoding yields for a UTF-8 sequence cut short


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        self._backend = _Backend.from_file(str(model_dir / "tokenizer.json"))
        config = _read_json(model_dir / "tokenizer_config.json")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self._bos_id = self._backend.token_to_id(self.bos_token) if self.bos_token else None
        self._add_bos = bool(config.get("add_bos_token", False)) and self._bos_id is not None
        self._eos_token_ids = self._collect_eos_ids(model_dir)
        source = _chat_template_source(model_dir, config)
        self._chat_template = _jinja_env().from_string(source) if source else None

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: config, generation config, then the tokenizer's eos."""
        return self._eos_token_ids

    def encode(self, text: str) -> list[int]:
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return [self._bos_id, *ids] if self._add_bos else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if self._chat_template is None:
            raise ValueError("this checkpoint has no chat template")
        text = self._chat_template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
        # The template writes any BOS itself; adding one here would double it.
        return self._backend.encode(text, add_special_tokens=False).ids

    def incremental_detokenizer(self, skip_special_tokens: bool = False) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self._backend, skip_special_tokens)

    def _collect_eos_ids(self, model_dir: Path) -> tuple[int, ...]:
        ids: list[int] = []
        for name in ("config.json", "generation_config.json"):
            ids += _as_id_list(_read_json(model_dir / name).get("eos_token_id"))
        if self.eos_token and (eos_id := self._backend.token_to_id(self.eos_token)) is not None:
            ids.append(eos_id)
        return tuple(dict.fromkeys(ids))  # dedupe, keep order


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation is decode(all ids).

    Decoding only the ids since the last emitted delta keeps each push O(window) rather than
    O(sequence). The window holds two parts:

        ids: [ ...already emitted... | prefix: emitted last time | pending: not yet emitted ]
                                     ^ window starts here       ^ _read

    The prefix is decoded again because byte-level and sentencepiece decoders look at a token's
    neighbours (a leading "▁" is dropped at the start of a text); the delta is what the
    pending ids add to it. Text is held back while it ends in an incomplete UTF-8 character.
    """

    def __init__(self, backend: _Backend, skip_special_tokens: bool) -> None:
        self._backend = backend
        self._skip_special_tokens = skip_special_tokens
        self._window: list[int] = []
        self._read = 0  # window[:_read] is the prefix, already emitted

    def push(self, token_id: int) -> str:
        self._window.append(token_id)
        prefix_text = self._decode(self._window[: self._read])
        text = self._decode(self._window)
        if text.endswith(_INCOMPLETE) or len(text) <= len(prefix_text):
            return ""
        del self._window[: self._read]
        self._read = len(self._window)
        return text[len(prefix_text) :]

    def flush(self) -> str:
        """Text still held back (e.g. a trailing incomplete character) at the end of a stream."""
        prefix_text = self._decode(self._window[: self._read])
        text = self._decode(self._window)
        del self._window[: self._read]
        self._read = len(self._window)
        return text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip_special_tokens) if ids else ""


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_text(token: str | dict | None) -> str | None:
    """tokenizer_config.json spells a special token as a string or as an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _as_id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _chat_template_source(model_dir: Path, config: dict[str, Any]) -> str | None:
    """transformers 5 saves the template as chat_template.jinja; older checkpoints keep it in the config."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t["name"]: t["template"] for t in template}
        return named.get("default") or next(iter(named.values()), None)
    return template


def _jinja_env() -> ImmutableSandboxedEnvironment:
    """The environment chat templates are written for: the one transformers renders them in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    # jinja's own tojson escapes HTML characters, which would change the prompt text.
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)
