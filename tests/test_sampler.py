import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from worker_svc.sampler import (NOT_FINISHED, Sampler, SamplingConfig, StopChecker,
                                StopDecision, _draw, make_generator)

VOCAB = 64


def random_logits(num_seqs: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(num_seqs, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log().unsqueeze(0)


def draw_many(probs: list[float], config: SamplingConfig, num_draws: int, seed: int = 0) -> torch.Tensor:
    """num_draws tokens from one distribution: one batch, all rows sharing one generator."""
    logits = logits_of(probs).expand(num_draws, -1).contiguous()
    generator = make_generator(seed)
    tokens = Sampler().sample(logits, [config] * num_draws, [generator] * num_draws)
    return torch.tensor(tokens)


def chi_square(tokens: torch.Tensor, expected_probs: torch.Tensor) -> float:
    observed = torch.bincount(tokens, minlength=len(expected_probs)).double()
    expected = expected_probs.double() * len(tokens)
    return float(((observed - expected) ** 2 / expected).sum())


# --- greedy -------------------------------------------------------------------------

def test_greedy_is_argmax_and_touches_no_generator():
    logits = random_logits(8, seed=1)
    generators = [make_generator(i) for i in range(8)]
    states = [g.get_state() for g in generators]
    tokens = Sampler().sample(logits, [SamplingConfig(max_tokens=4, temperature=0.0)] * 8, generators)
    assert tokens == logits.argmax(dim=-1).tolist()
    assert all(torch.equal(g.get_state(), s) for g, s in zip(generators, states))


def test_greedy_rows_in_a_mixed_batch_are_argmax():
    logits = random_logits(6, seed=2)
    configs = [SamplingConfig(4, temperature=0.0 if i % 2 == 0 else 1.0, top_k=5 if i == 3 else 0)
               for i in range(6)]
    tokens = Sampler().sample(logits, configs, [make_generator(i) for i in range(6)])
    argmax = logits.argmax(dim=-1).tolist()
    assert [tokens[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]


def test_caller_logits_are_not_modified():
    logits = random_logits(4, seed=3)
    before = logits.clone()
    configs = [SamplingConfig(4, temperature=0.0), SamplingConfig(4, temperature=0.7),
               SamplingConfig(4, temperature=1.3, top_k=3), SamplingConfig(4, temperature=0.5, top_p=0.8)]
    Sampler().sample(logits, configs, [make_generator(i) for i in range(4)])
    assert torch.equal(logits, before)


@pytest.mark.parametrize("temperature", [1e-3, 0.5, 1.0, 2.0, 100.0])
@pytest.mark.parametrize("top_p", [1.0, 0.3])
def test_top_k_1_is_greedy_at_any_temperature(temperature, top_p):
    logits = random_logits(16, seed=4)
    logits[0, 5] = logits[0, 9] = logits[0].max() + 1    # a tie: both must pick the first
    configs = [SamplingConfig(4, temperature=temperature, top_k=1, top_p=top_p)] * 16
    tokens = Sampler().sample(logits, configs, [make_generator(i) for i in range(16)])
    assert tokens == logits.argmax(dim=-1).tolist()
    assert tokens[0] == 5


def test_tiny_temperature_is_greedy_not_nan():
    logits = random_logits(3, seed=5) * 1e6
    tokens = Sampler().sample(logits, [SamplingConfig(4, temperature=1e-9)] * 3, [None] * 3)
    assert tokens == logits.argmax(dim=-1).tolist()


# --- reproducibility ----------------------------------------------------------------

NEIGHBOURS = [SamplingConfig(8, temperature=0.0), SamplingConfig(8, temperature=1.0),
              SamplingConfig(8, temperature=0.8, top_k=10), SamplingConfig(8, temperature=1.2, top_p=0.9)]


@pytest.mark.parametrize("config", [SamplingConfig(8, temperature=1.0, seed=1234),
                                    SamplingConfig(8, temperature=0.7, top_k=20, seed=99),
                                    SamplingConfig(8, temperature=1.5, top_p=0.95, seed=7)])
def test_seeded_request_is_the_same_alone_and_in_a_batch(config):
    sampler = Sampler()
    alone_generator = make_generator(config.seed)
    batch_generator = make_generator(config.seed)
    neighbour_generators = [None, make_generator(None), make_generator(5), None]
    alone, batched = [], []
    for step in range(30):
        logits = random_logits(5, seed=100 + step)
        alone += sampler.sample(logits[2:3], [config], [alone_generator])
        # The seeded row sits in the middle; the batch also varies from step to step.
        order = NEIGHBOURS[step % 4:] + NEIGHBOURS[:step % 4]
        configs = order[:2] + [config] + order[2:]
        generators = neighbour_generators[:2] + [batch_generator] + neighbour_generators[2:]
        batched.append(sampler.sample(logits, configs, generators)[2])
    assert alone == batched
    assert len(set(alone)) > 1      # really random, not accidentally greedy


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = random_logits(1, seed=6).expand(50, -1).contiguous()
    config = SamplingConfig(8)

    def run(seed):
        generator = make_generator(seed)
        return Sampler().sample(logits, [config] * 50, [generator] * 50)

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_unseeded_generators_differ():
    logits = random_logits(1, seed=7).expand(50, -1).contiguous()
    draws = [Sampler().sample(logits, [SamplingConfig(8)] * 50, [make_generator(None)] * 50) for _ in range(2)]
    assert draws[0] != draws[1]


# --- top-k / top-p ------------------------------------------------------------------

# Probabilities placed out of order in the vocab so that sorting is exercised.
NUCLEUS_PROBS = [0.06, 0.25, 0.04, 0.4, 0.1, 0.15]   # by rank: ids 3, 1, 5, 4, 0, 2


def test_top_p_keeps_exactly_the_nucleus():
    # Mass above each rank: 0, .40, .65, .80, .90, .96 -> top_p .75 keeps ids 3, 1, 5.
    tokens = draw_many(NUCLEUS_PROBS, SamplingConfig(4, top_p=0.75), num_draws=2000)
    assert set(tokens.tolist()) == {3, 1, 5}
    kept = torch.tensor([0, 0.25, 0, 0.4, 0, 0.15]) / 0.8
    assert chi_square(tokens, kept.clamp(min=1e-12)) < 20    # renormalised within the nucleus


def test_top_p_stops_at_the_first_prefix_reaching_it():
    # Four equal logits give exactly .25 each: ids 0 and 1 reach .5, so id 2 is out.
    tokens = draw_many([0.25] * 4, SamplingConfig(4, top_p=0.5), num_draws=1000)
    assert set(tokens.tolist()) == {0, 1}


def test_top_p_always_keeps_the_top_token():
    tokens = draw_many(NUCLEUS_PROBS, SamplingConfig(4, top_p=0.01), num_draws=200)
    assert set(tokens.tolist()) == {3}


def test_top_k_keeps_the_k_most_likely():
    tokens = draw_many(NUCLEUS_PROBS, SamplingConfig(4, top_k=4), num_draws=2000)
    assert set(tokens.tolist()) == {3, 1, 5, 4}


def test_top_p_applies_after_top_k_renormalises():
    # top_k 2 leaves .4/.65 = .615 and .25/.65 = .385; top_p .6 then keeps only id 3,
    # whereas top_p .6 on the full distribution would also keep id 1.
    tokens = draw_many(NUCLEUS_PROBS, SamplingConfig(4, top_k=2, top_p=0.6), num_draws=500)
    assert set(tokens.tolist()) == {3}


def test_zero_probability_tokens_are_never_drawn():
    probs = [0.0, 0.5, 0.0, 0.5, 0.0]
    for config in (SamplingConfig(4), SamplingConfig(4, top_k=4)):
        tokens = draw_many(probs, config, num_draws=2000)
        assert set(tokens.tolist()) == {1, 3}


def test_a_draw_at_the_top_of_the_cdf_lands_on_the_last_possible_token():
    # u = 1.0 stands in for u * total rounding up to total: without the clamp the
    # search would run past the last token with probability.
    probs = torch.tensor([[0.1, 0.2, 0.0, 0.0], [0.3, 0.0, 0.7, 0.0]])
    assert _draw(probs, torch.tensor([1.0, 1.0])).tolist() == [1, 2]
    assert _draw(probs, torch.tensor([0.0, 0.0])).tolist() == [0, 0]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_reshapes_the_distribution(temperature):
    probs = torch.tensor([0.05, 0.1, 0.15, 0.3, 0.4])
    tempered = probs ** (1 / temperature)
    tempered /= tempered.sum()
    tokens = draw_many(probs.tolist(), SamplingConfig(4, temperature=temperature), num_draws=20000, seed=11)
    # 4 degrees of freedom: P(chi2 > 25) ~ 5e-5; the seed is fixed, so this cannot flake.
    assert chi_square(tokens, tempered) < 25
    if temperature != 1.0:
        assert chi_square(tokens, probs) > 100     # and the test can tell temperatures apart


# --- SamplingConfig.validate ---------------------------------------------------------

@pytest.mark.parametrize("field, overrides", [
    ("max_tokens", {"max_tokens": 0}),
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": math.nan}),
    ("temperature", {"temperature": math.inf}),
    ("top_p", {"top_p": 1.5}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": math.nan}),
    ("top_k", {"top_k": -1}),
    ("seed", {"seed": -1}),
    ("seed", {"seed": 2**64}),
    ("stop_token_ids", {"stop_token_ids": (2, -3)}),
    ("stop", {"stop": ("ok", "")}),
])
def test_validate_names_the_field(field, overrides):
    config = SamplingConfig(**{"max_tokens": 16, **overrides})
    with pytest.raises(ValueError, match=rf"^sampling\.{field} "):
        config.validate()


def test_validate_message_reads_well():
    with pytest.raises(ValueError, match=r"^sampling\.top_p must be in \(0, 1\], got 1\.5$"):
        SamplingConfig(16, top_p=1.5).validate()


def test_valid_config_passes():
    SamplingConfig(16, temperature=0.0, top_p=1.0, top_k=0, seed=2**64 - 1, stop_token_ids=(0,), stop=("x",)).validate()


# --- StopChecker --------------------------------------------------------------------

EOS = 2


def test_eos_stops():
    checker = StopChecker(SamplingConfig(10), eos_token_ids=[EOS])
    assert checker.check(5, "a", 1) == NOT_FINISHED
    assert checker.check(EOS, "a", 2) == StopDecision(True, "stop", None)


def test_ignore_eos_keeps_going_but_stop_token_ids_still_count():
    checker = StopChecker(SamplingConfig(10, ignore_eos=True, stop_token_ids=(7,)), eos_token_ids=[EOS])
    assert checker.check(EOS, "a", 1) == NOT_FINISHED
    assert checker.check(7, "a", 2) == StopDecision(True, "stop", None)


def test_length():
    checker = StopChecker(SamplingConfig(3), eos_token_ids=[EOS])
    assert checker.check(5, "a", 2) == NOT_FINISHED
    assert checker.check(5, "ab", 3) == StopDecision(True, "length", None)


def test_stop_string_spanning_two_deltas_is_cut_before_it():
    checker = StopChecker(SamplingConfig(10, stop=("END",)))
    assert checker.check(5, "abc E", 1) == NOT_FINISHED
    assert checker.check(6, "abc EN", 2) == NOT_FINISHED
    decision = checker.check(7, "abc END more", 3)
    assert decision == StopDecision(True, "stop", 4)
    assert "abc END more"[:decision.truncate_text_at] == "abc "


def test_earliest_stop_string_wins_and_beats_length():
    checker = StopChecker(SamplingConfig(1, stop=("xyz", "b")))
    assert checker.check(5, "a xyz b", 1) == StopDecision(True, "stop", 2)


def test_stop_string_at_the_very_start():
    checker = StopChecker(SamplingConfig(10, stop=("\n\n",)))
    assert checker.check(5, "\n", 1) == NOT_FINISHED
    assert checker.check(5, "\n\nhello", 2) == StopDecision(True, "stop", 0)


@settings(max_examples=300, deadline=None)
@given(deltas=st.lists(st.text("abc", max_size=4), min_size=1, max_size=12),
       stops=st.lists(st.text("abc", min_size=1, max_size=4), min_size=1, max_size=3))
def test_tail_search_agrees_with_searching_the_whole_text(deltas, stops):
    checker = StopChecker(SamplingConfig(100, stop=tuple(stops)))
    text = ""
    for step, delta in enumerate(deltas, start=1):
        text += delta
        whole = [i for s in stops if (i := text.find(s)) >= 0]
        decision = checker.check(5, text, step)
        if whole:
            assert decision == StopDecision(True, "stop", min(whole))
            return
        assert decision == NOT_FINISHED
