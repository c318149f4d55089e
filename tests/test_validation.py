"""scheduler_svc/validation.py, pure: every limit refuses with the field it names, and
the config's limits are the ones applied (the live refusals are in test_fuzz.py)."""
import dataclasses

import pytest

from bros.v1 import inference_pb2 as ipb
from bros.v1 import types_pb2 as tpb
from scheduler_svc.config import SchedulerConfig
from scheduler_svc.validation import InvalidArgument, check_generate, check_length, check_lookup, check_request_id

VOCAB, MAX_LEN = 1000, 64


def request(**sampling) -> ipb.GenerateRequest:
    return ipb.GenerateRequest(token_ids=ipb.TokenIds(ids=[1, 2, 3]), service_class=tpb.REALTIME,
                               sampling=tpb.SamplingParams(max_tokens=4, **sampling))


def refused(fn, *args) -> str:
    with pytest.raises(InvalidArgument) as e:
        fn(*args)
    assert str(e.value).startswith(e.value.field + ": ")
    return e.value.field


@pytest.mark.parametrize("rid", ["a\n", "\na", "a b", "é", "a" * 129, "a/b"])
def test_request_id_must_be_the_whole_pattern(rid):
    assert refused(check_request_id, rid, False) == "request_id"


def test_request_id_length_is_the_configured_one():
    check_request_id("a" * 128, True)
    assert refused(check_request_id, "a" * 9, True, 8) == "request_id"
    assert refused(check_request_id, "", True) == "request_id"
    check_request_id("", False)


def test_configured_limits_apply():
    cfg = dataclasses.replace(SchedulerConfig(), max_stop_strings=2, max_stop_string_chars=3, max_stop_token_ids=1)
    check_generate(request(stop=["ab", "abc"], stop_token_ids=[7]), cfg, VOCAB, MAX_LEN)
    assert refused(check_generate, request(stop=["a", "b", "c"]), cfg, VOCAB, MAX_LEN) == "sampling.stop"
    assert refused(check_generate, request(stop=["abcd"]), cfg, VOCAB, MAX_LEN) == "sampling.stop"
    assert refused(check_generate, request(stop_token_ids=[1, 2]), cfg, VOCAB, MAX_LEN) == "sampling.stop_token_ids"
    assert refused(check_generate, request(stop_token_ids=[VOCAB]), SchedulerConfig(), VOCAB, MAX_LEN) \
        == "sampling.stop_token_ids"


def test_lookup_checks_the_resume_index_only_where_there_is_one():
    check_lookup(ipb.AbortRequest(request_id="r1"), SchedulerConfig())
    check_lookup(ipb.WatchRequest(request_id="r1", resume_from_index=-1), SchedulerConfig())
    assert refused(check_lookup, ipb.WatchRequest(request_id="r1", resume_from_index=-2), SchedulerConfig()) \
        == "resume_from_index"
    assert refused(check_lookup, ipb.AbortRequest(), SchedulerConfig()) == "request_id"


def test_length_blames_the_prompt_when_it_alone_fills_the_context():
    check_length(60, 4, MAX_LEN)
    assert refused(check_length, 64, 1, MAX_LEN, "text") == "text"
    assert refused(check_length, 61, 4, MAX_LEN, "text") == "sampling.max_tokens"


@pytest.mark.parametrize("name", ["max_prompt_chars", "max_chat_messages", "max_stop_string_chars",
                                  "max_request_id_chars"])
def test_limits_must_be_positive(name):
    with pytest.raises(ValueError, match=name):
        SchedulerConfig(**{name: 0})
