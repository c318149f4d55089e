"""The bearer-token table: which tokens may call the scheduler, and with which service
classes. Pure: text in, table out; the file is read by the caller.

File format (--auth-tokens-file; a Kubernetes Secret mounted as a file works as is):

    # comment
    <token> <class>[,<class>]       class: rt or be, e.g. `k3y... rt,be`

A token is never kept or shown as text: the table holds SHA-256 digests, a lookup
compares against every entry in constant time, and a request stores only the digest's
prefix (`identity`) as its owner. Tokens should be random (`openssl rand -hex 32`):
a short guessable token is found from its digest as easily as by trying it.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from .keys import BEST_EFFORT, REALTIME

CLASS_NAMES = {"rt": REALTIME, "be": BEST_EFFORT}
MIN_TOKEN_CHARS = 16


def digest(token: str) -> bytes:
    return hashlib.sha256(b"bros-token\0" + token.encode()).digest()


def identity(token: str) -> str:
    """Who a token is, as stored with each of its requests: not the token, not reversible."""
    return digest(token).hex()[:32]


@dataclass(frozen=True)
class TokenEntry:
    digest: bytes
    classes: frozenset[int]                 # REALTIME and/or BEST_EFFORT


class TokenTable:
    def __init__(self, entries: list[TokenEntry]):
        self.entries = entries

    def classes_of(self, token: str) -> frozenset[int] | None:
        """The classes `token` may send, None if it is unknown. Every entry is compared,
        match or not, so the time taken says nothing about which tokens exist."""
        presented = digest(token)
        found = None
        for entry in self.entries:
            if hmac.compare_digest(presented, entry.digest):
                found = entry.classes
        return found


def parse_token_table(text: str, source: str = "tokens file") -> TokenTable:
    """Raises ValueError naming the line; the message never contains a token."""
    entries: list[TokenEntry] = []
    seen: set[bytes] = set()
    for num, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        where = f"{source} line {num}"
        if len(fields) != 2:
            raise ValueError(f"{where}: expected '<token> <class>[,<class>]', got {len(fields)} fields")
        token, class_list = fields
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"{where}: token is shorter than {MIN_TOKEN_CHARS} characters")
        names = class_list.split(",")
        bad = [n for n in names if n not in CLASS_NAMES]
        if bad:
            raise ValueError(f"{where}: class must be rt or be (comma-separated), got {bad[0]!r}")
        d = digest(token)
        if d in seen:
            raise ValueError(f"{where}: the same token is listed twice")
        seen.add(d)
        entries.append(TokenEntry(d, frozenset(CLASS_NAMES[n] for n in names)))
    if not entries:
        raise ValueError(f"{source}: no tokens (every caller would be refused)")
    return TokenTable(entries)
