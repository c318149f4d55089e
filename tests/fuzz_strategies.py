"""Hypothesis strategies for hostile input: bros.v1 messages with values at and past every
limit, ids that collide, and bytes that are not messages at all.

Each strategy mixes well-formed values (so a share of the cases reach the deep code:
admission, the worker's pool, sampling) with the edges: 0, negative where the type
allows it, 2**32-1, NaN, empty strings, unknown enum numbers, ids that name nothing or
the same sequence twice.
"""
from __future__ import annotations

import random

from hypothesis import strategies as st

from bros.v1 import inference_pb2 as ipb
from bros.v1 import types_pb2 as tpb
from bros.v1 import worker_pb2 as wpb

U32 = 2**32 - 1
U64 = 2**64 - 1
I64_MIN, I64_MAX = -2**63, 2**63 - 1

# Ids shared by every case, so requests and sequences meet again: attach, duplicate, free twice.
REQUEST_IDS = ["fz-a", "fz-b", "fz-c", "fz.d:1", "fz_e-2"]
SEQ_IDS = ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7"]


@st.composite
def mostly(draw, good: st.SearchStrategy, bad: st.SearchStrategy, odds: int = 7):
    """good about odds times in odds + 1, else bad: each field is hostile now and then, so
    a fair share of whole messages gets past validation to the code behind it."""
    # (st.one_of would not do: it draws among distinct branches, so repeats add no weight;
    # flatmap would, but revalidates the strategy on every draw.)
    return draw(bad if draw(st.sampled_from(range(odds + 1))) == 0 else good)


u32 = st.one_of(st.integers(0, 64), st.integers(0, U32))
any_float = st.floats(width=32, allow_nan=True, allow_infinity=True)
any_text = st.text(max_size=24)
service_class = mostly(st.sampled_from([tpb.REALTIME, tpb.BEST_EFFORT]),
                       st.sampled_from([tpb.SERVICE_CLASS_UNSPECIFIED, 3, -1, 2**31 - 1]))


def _seeded_ids(n: int, seed: int, vocab_size: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab_size) for _ in range(n)]


def token_ids(vocab_size: int, max_len: int = 48) -> st.SearchStrategy[list[int]]:
    """Mostly in the vocabulary, sometimes one beyond it; now and then far too many.

    A list is drawn as (length, seed), not id by id: Hypothesis spends ~20 us per draw,
    and ten thousand cases of 50-token prompts would spend minutes on drawing alone."""
    good = st.builds(_seeded_ids, st.integers(1, max_len), st.integers(0, U32), st.just(vocab_size))
    beyond = st.one_of(st.just(vocab_size), st.integers(vocab_size, U32))
    one_bad = st.tuples(good, st.integers(0, max_len), beyond).map(
        lambda t: t[0][:t[1]] + [t[2]] + t[0][t[1]:])
    bad = st.one_of(st.just([]), one_bad,
                    st.integers(1, 20_000).map(lambda n: [7] * n))  # past the context or the pool
    return mostly(good, bad, 4)


@st.composite
def sampling(draw, vocab_size: int) -> tpb.SamplingParams:
    s = tpb.SamplingParams(max_tokens=draw(mostly(st.integers(1, 16), st.one_of(st.just(0), u32))),
                           top_k=draw(mostly(st.integers(0, 50), u32, 3)), ignore_eos=draw(st.booleans()))
    if draw(st.booleans()):
        s.temperature = draw(mostly(st.one_of(st.just(0.0), st.floats(0, 2, width=32)), any_float))
    if draw(st.booleans()):
        s.top_p = draw(mostly(st.floats(0.0625, 1, width=32), any_float))
    if draw(st.booleans()):
        s.seed = draw(st.integers(0, U64))
    s.stop_token_ids.extend(draw(mostly(st.lists(st.integers(0, vocab_size - 1), max_size=3),
                                        st.one_of(st.lists(u32, min_size=1, max_size=3),
                                                  st.integers(257, 300).map(lambda n: [9] * n)))))
    s.stop.extend(draw(mostly(st.lists(st.text(min_size=1, max_size=6), max_size=3),
                              st.one_of(st.lists(any_text, max_size=3),
                                        st.integers(17, 20).map(lambda n: ["x"] * n),  # > max_stop_strings
                                        st.integers(257, 300).map(lambda n: ["y" * n])),
                              3)))
    return s


chat_role = mostly(st.sampled_from(["user", "system", "assistant"]), st.sampled_from(["", "bot", "tool", "USER"]))
request_id = mostly(st.one_of(st.just(""), st.sampled_from(REQUEST_IDS)),
                    st.one_of(any_text, st.just("fz-a\n"), st.integers(129, 140).map(lambda n: "a" * n)), 4)
resume_index = mostly(st.one_of(st.none(), st.integers(-1, 8)), st.integers(I64_MIN, I64_MAX), 4)


# Which prompt a GenerateRequest carries, by weight (sampled_from draws an index, so a
# repeated entry counts again). The sim backend has no tokenizer: mostly token ids there.
PROMPT_KINDS = ("token_ids",) * 5 + ("text", "chat", None)
TEXT_PROMPT_KINDS = ("text", "text", "chat", "chat", "token_ids", None)


@st.composite
def generate_request(draw, vocab_size: int, prompt_kinds=PROMPT_KINDS) -> ipb.GenerateRequest:
    req = ipb.GenerateRequest(service_class=draw(service_class), ttft_ms=draw(u32), tpot_ms=draw(u32),
                              request_id=draw(request_id), timeout_ms=draw(mostly(st.just(0), u32, 3)))
    which = draw(st.sampled_from(prompt_kinds))
    if which == "token_ids":
        req.token_ids.ids.extend(draw(token_ids(vocab_size)))
    elif which == "text":
        req.text = draw(any_text)
    elif which == "chat":
        for role, content in draw(st.lists(st.tuples(chat_role, any_text), max_size=4)):
            req.chat.messages.add(role=role, content=content)
    if draw(st.integers(0, 19)):  # unset sampling (max_tokens 0) one time in twenty
        req.sampling.CopyFrom(draw(sampling(vocab_size)))
    index = draw(resume_index)
    if index is not None:
        req.resume_from_index = index
    return req


@st.composite
def watch_request(draw) -> ipb.WatchRequest:
    req = ipb.WatchRequest(request_id=draw(request_id), wait=draw(st.booleans()))
    index = draw(resume_index)
    if index is not None:
        req.resume_from_index = index
    return req


abort_request = st.builds(ipb.AbortRequest, request_id=request_id)

# Metadata a client may send: nothing, a few ordinary entries, or one too big for gRPC.
metadata = mostly(st.just(()), st.one_of(
    st.lists(st.tuples(st.sampled_from(["x-fuzz", "authorization", "x-request-id", "user-agent-x"]),
                       st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=32)),
             max_size=3).map(tuple),
    st.integers(17_000, 40_000).map(lambda n: (("x-big", "a" * n),))), 5)

# ---- the worker's Step protocol ----------------------------------------------------------

seq_id = mostly(st.sampled_from(SEQ_IDS), st.one_of(st.just(""), any_text))
# Lifecycle lists: usually empty, so most plans get to run something.
seq_ids = mostly(st.just([]), st.lists(seq_id, min_size=1, max_size=3), 3)


@st.composite
def new_sequence(draw, vocab_size: int) -> wpb.NewSequence:
    n = wpb.NewSequence(seq_id=draw(seq_id), service_class=draw(service_class),
                        prompt_token_ids=draw(token_ids(vocab_size)))
    if draw(st.integers(0, 19)):
        n.sampling.CopyFrom(draw(sampling(vocab_size)))
    if draw(st.integers(0, 5)) == 0:  # carried output from a lost worker
        n.output_token_ids.extend(draw(token_ids(vocab_size, max_len=8)))
    return n


scheduled = st.builds(wpb.ScheduledSequence, seq_id=seq_id,
                      num_tokens=mostly(st.one_of(st.just(1), st.integers(1, 40)),
                                        st.one_of(st.just(0), st.integers(0, U32)), 4))


@st.composite
def step_plan(draw, vocab_size: int) -> wpb.StepPlan:
    return wpb.StepPlan(plan_id=draw(st.integers(0, U64)),
                        new_sequences=draw(st.lists(new_sequence(vocab_size), max_size=2)),
                        scheduled=draw(st.lists(scheduled, max_size=3)),
                        preempt=draw(seq_ids), checkpoint=draw(seq_ids), restore=draw(seq_ids),
                        recompute=draw(seq_ids), free=draw(seq_ids),
                        list_resident=draw(st.booleans()))


@st.composite
def tokenize_request(draw) -> wpb.TokenizeRequest:
    req = wpb.TokenizeRequest()
    which = draw(st.sampled_from(["text", "chat", None]))
    if which == "text":
        req.text = draw(st.text(max_size=60))
    elif which == "chat":
        for role, content in draw(st.lists(st.tuples(chat_role, st.text(max_size=40)), max_size=4)):
            req.chat.messages.add(role=role, content=content)
    return req


# ---- bytes that may not be a message at all ------------------------------------------------

@st.composite
def mutated(draw, valid: st.SearchStrategy) -> bytes:
    """A valid message's bytes, then cut, flipped, spliced or replaced: most of the time
    still close enough to the format to get past the first byte."""
    raw = bytearray(draw(valid).SerializeToString())
    kind = draw(st.sampled_from(["random", "truncate", "flip", "insert", "as_is"]))
    if kind == "random" or not raw:
        return draw(st.binary(max_size=200))
    if kind == "truncate":
        return bytes(raw[:draw(st.integers(0, len(raw) - 1))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(raw)
    if kind == "insert":
        i = draw(st.integers(0, len(raw)))
        return bytes(raw[:i] + draw(st.binary(min_size=1, max_size=16)) + raw[i:])
    return bytes(raw)


HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# What an attacker writes to the port before any gRPC: noise, HTTP/1, or HTTP/2 with junk frames.
tcp_garbage = st.one_of(
    st.binary(max_size=512),
    st.binary(max_size=256).map(lambda b: HTTP2_PREFACE + b),
    st.binary(max_size=64).map(lambda b: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b),
    # a SETTINGS frame header with a wild length, then noise
    st.tuples(st.integers(0, 2**24 - 1), st.binary(max_size=128)).map(
        lambda t: HTTP2_PREFACE + t[0].to_bytes(3, "big") + b"\x04\x00\x00\x00\x00\x00" + t[1]),
)
