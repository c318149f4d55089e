"""projection.project: the sequences as a plan already sent leaves them."""
from scheduler_svc.planner import BE, RT, SeqView
from scheduler_svc.projection import project


def view(rid, prompt, computed, produced=0, cls=RT, first=None, preempted=False, max_tokens=0):
    return SeqView(request_id=rid, service_class=cls, arrival_ms=0.0, num_prompt_tokens=prompt,
                   num_tokens=prompt + produced, num_computed_tokens=computed, first_token_ms=first,
                   last_token_ms=first, num_output_tokens=produced, preempted=preempted, max_tokens=max_tokens)


def test_a_chunk_that_reaches_the_end_samples_a_token_when_the_plan_ends():
    views = {"mid": view("mid", 40, 0), "last": view("last", 40, 24), "dec": view("dec", 8, 9, produced=2, first=5.0)}
    out, opened = project(views, [("mid", 16), ("last", 16), ("dec", 1)], done_ms=100.0, block_size=16)
    mid, last, dec = out["mid"], out["last"], out["dec"]
    assert (mid.num_computed_tokens, mid.num_tokens, mid.first_token_ms) == (16, 40, None)   # prompt left: no token
    assert (last.num_computed_tokens, last.num_tokens, last.num_output_tokens) == (40, 41, 1)
    assert last.first_token_ms == last.last_token_ms == 100.0                                  # its first token
    assert (dec.num_computed_tokens, dec.num_tokens, dec.num_output_tokens) == (10, 11, 3)
    assert dec.first_token_ms == 5.0 and dec.last_token_ms == 100.0
    # Blocks of 16: mid opens its first, last its third (24 -> 40), dec none (9 -> 10).
    assert opened == 2
    assert views["mid"].num_computed_tokens == 0 and views["dec"].num_tokens == 10   # inputs untouched


def test_unscheduled_and_unknown_sequences_are_left_alone_and_scheduling_resumes():
    paused = view("paused", 16, 16, produced=1, cls=BE, first=1.0, preempted=True)
    idle = view("idle", 16, 16, produced=1, cls=BE, first=1.0)
    out, opened = project({"paused": paused, "idle": idle}, [("paused", 1), ("gone", 1)], done_ms=50.0, block_size=16)
    assert out["idle"] is idle and "gone" not in out
    assert not out["paused"].preempted and out["paused"].num_computed_tokens == 17
    assert opened == 1   # 16 -> 17 slots: a second block


def test_an_item_larger_than_what_is_left_is_cut_to_it():
    # The worker would refuse it; what can run is at most the uncomputed tokens.
    out, _ = project({"s": view("s", 10, 4)}, [("s", 64)], done_ms=1.0, block_size=16)
    assert out["s"].num_computed_tokens == 10 and out["s"].num_tokens == 11


def test_a_sequence_that_reaches_its_max_tokens_ends_and_gives_its_blocks_back():
    # 40 prompt tokens and 8 outputs: 47 computed in 3 blocks of 16; this decode is its last.
    done = view("done", 40, 47, produced=8, cls=BE, first=1.0, max_tokens=9)
    going = view("going", 40, 47, produced=8, cls=BE, first=1.0, max_tokens=10)
    out, taken = project({"done": done, "going": going}, [("done", 1), ("going", 1)], done_ms=9.0, block_size=16)
    assert set(out) == {"going"} and out["going"].num_output_tokens == 9
    assert taken == -3   # done's 48 computed slots free 3 blocks; neither opens one (47 -> 48)
