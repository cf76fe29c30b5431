"""Chunked prefill, paged K/V and prefix caching give exactly the greedy tokens of full recomputation.

Every test compares the engine's greedy output with the model recomputing the whole sequence for every new
token (no cache at all), which tests/model checks against the explicit-loop reference; one test compares with
that reference directly. The tiny models have window w = 3 (a ring of 4), so prompts of a dozen tokens already
wrap the rings many times, and every prefix hit resumes with a local window that reaches back into the cached
part.
"""

from __future__ import annotations

import pytest
import torch

from loopcoder.inference.engine import Engine
from loopcoder.inference.sampling import SamplingParams
from loopcoder.utils.errors import LoopcoderError
from support.models import ARCHS, full_recompute_greedy, tiny_model
from support.reference import reference_logits

# (loops, architecture): R = 1, PLT-2, PLT-3, the vanilla looped transformer and PLT without CLP's offset
VARIANTS = [(1, "plt"), (2, "plt"), (3, "plt"), (2, "vanilla"), (3, "no-offset")]
GEN = 6


def model_for(loops: int, arch: str, **overrides):
    return tiny_model(dtype=torch.float32, plt_num_loops=loops, **ARCHS[arch], eos_token_id=None, **overrides)


def prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 61, (n,), generator=g).tolist()


def run(engine: Engine, prompts: list[list[int]], n: int = GEN) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(prompts, SamplingParams(max_new_tokens=n))]


@pytest.mark.parametrize("loops,arch", VARIANTS)
@pytest.mark.parametrize("paged", [True, False])
def test_chunked_prefill_equals_full_recompute(loops, arch, paged):
    """Budgets of 3 and 5 tokens split a 23-token prompt into chunks that start and end anywhere in the ring
    and in the blocks, while other sequences decode in the same steps."""
    model = model_for(loops, arch)
    prompts = [prompt(23, 1), prompt(9, 2), prompt(14, 3)]
    want = [full_recompute_greedy(model, p, GEN) for p in prompts]
    for budget in (3, 5):
        engine = Engine(model, max_batch=2, max_step_tokens=budget, paged=paged, block_size=4)
        assert run(engine, prompts) == want
        assert engine.cache_stats()["prefill_chunks"] > len(prompts)  # the prompts really were chunked


@pytest.mark.parametrize("loops,arch", VARIANTS)
@pytest.mark.parametrize("block_size,window", [(4, 3), (2, 3), (3, 5), (8, 3)])
def test_prefix_hits_equal_full_recompute(loops, arch, block_size, window):
    """A second prompt repeats the first one's prefix (of every length from 1 block to the whole prompt) and
    adds tokens; its prefill resumes from the cached blocks and, for PLT, the rings and CLP states of the
    boundary snapshot. Window 5 with blocks of 3: a ring spans two blocks and a hit can only resume at every
    second boundary; blocks of 8 hold two rings."""
    model = model_for(loops, arch, plt_window_size=[window, 0])
    base = prompt(21, 4)
    engine = Engine(model, max_batch=1, block_size=block_size, max_step_tokens=None)
    assert run(engine, [base]) == [full_recompute_greedy(model, base, GEN)]  # and fills the cache
    hits = 0
    for cut in range(block_size, len(base) + 1, block_size):
        p = base[:cut] + prompt(5, cut)
        before = engine.cache_stats()["prefix_hit_tokens"]
        assert run(engine, [p]) == [full_recompute_greedy(model, p, GEN)], f"prefix of {cut} tokens"
        hits += engine.cache_stats()["prefix_hit_tokens"] > before
    assert hits >= len(range(block_size, len(base) + 1, block_size)) - 1  # every cut past one snapshot hits


@pytest.mark.parametrize("loops,arch", VARIANTS)
def test_prompt_equal_to_a_cached_sequence_and_its_output(loops, arch):
    """A prompt that is a whole earlier prompt plus its greedy output (what an agent sends next) hits the
    blocks written during decoding too, whose snapshots were taken from the decode step's rings."""
    model = model_for(loops, arch)
    engine = Engine(model, max_batch=2, block_size=4, max_step_tokens=6)
    first = prompt(10, 5)
    out = run(engine, [first], 14)[0]
    follow_up = first + out + prompt(3, 6)
    assert run(engine, [follow_up]) == [full_recompute_greedy(model, follow_up, GEN)]
    stats = engine.cache_stats()
    assert stats["prefix_hit_tokens"] >= 20, stats


def test_prefix_hit_matches_the_explicit_loop_reference():
    """PLT-3 in float64, a chunked prefill resuming from a prefix hit at position 15 (blocks of 5; not a multiple
    of the ring's w + 1 = 4): the greedy tokens of the spec's slow explicit-loop reference."""
    model = tiny_model(dtype=torch.float64, plt_num_loops=3, eos_token_id=None)
    state = model.state_dict()
    base = prompt(17, 7)
    engine = Engine(model, max_batch=2, block_size=5, max_step_tokens=4)
    run(engine, [base], 1)
    p = base[:16] + prompt(3, 8)
    got = run(engine, [p], 4)[0]
    assert engine.cache_stats()["prefix_hit_tokens"] == 15
    seq = list(p)
    for _ in range(4):
        seq.append(int(reference_logits(model.config, state, seq)[-1].argmax()))
    assert got == seq[len(p) :]


def test_samples_of_one_prompt_share_its_chunked_prefill():
    model = model_for(3, "plt")
    p = prompt(19, 9)
    engine = Engine(model, max_batch=3, block_size=4, max_step_tokens=7, prefix_caching=False)
    assert run(engine, [p, p, p]) == [full_recompute_greedy(model, p, GEN)] * 3
    assert engine.cache_stats()["forks"] == 2
    assert engine.cache_stats()["prefill_tokens"] == len(p)


def test_running_streams_get_a_token_every_step_while_a_long_prompt_prefills():
    model = model_for(2, "plt")
    engine = Engine(model, max_batch=3, block_size=4, max_step_tokens=6)
    short = [engine.add_request(prompt(4, s), SamplingParams(max_new_tokens=40)) for s in (10, 11)]
    while not all(r.output_ids for r in short):
        engine.step()
    long = engine.add_request(prompt(60, 12), SamplingParams(max_new_tokens=3))
    steps = 0
    while not long.output_ids:
        before = [len(r.output_ids) for r in short]
        engine.step()
        steps += 1
        assert [len(r.output_ids) for r in short] == [b + 1 for b in before]  # nobody waits for the prefill
    assert steps >= 60 // 4  # 4 tokens a step are left to the prefill
    while engine.has_work():
        engine.step()
    assert long.output_ids == full_recompute_greedy(model, long.prompt_ids, 3)


@pytest.mark.parametrize("loops,arch", [(3, "plt"), (2, "vanilla")])
def test_a_tiny_pool_makes_requests_wait_or_be_preempted_never_corrupted(loops, arch):
    """A pool of 12 blocks of 4 for four requests that need up to 8 blocks each: sequences are preempted
    (their blocks freed, recomputed later) and queued requests wait; every output is still exact."""
    model = model_for(loops, arch)
    prompts = [prompt(n, 20 + n) for n in (17, 11, 21, 6)]
    want = [full_recompute_greedy(model, p, 12) for p in prompts]
    for caching in (True, False):
        engine = Engine(model, max_batch=4, block_size=4, kv_cache_tokens=48, max_step_tokens=9, prefix_caching=caching)
        assert run(engine, prompts, 12) == want
        stats = engine.cache_stats()
        assert stats["preemptions"] > 0 and stats["blocks_held"] == 0, stats
        assert engine.num_running == 0


def test_a_sequence_that_outgrows_the_whole_pool_ends_at_its_length():
    """16 positions hold the prompt and 6 tokens; the 7th is sampled from the last position's logits."""
    model = model_for(2, "plt")
    engine = Engine(model, max_batch=1, block_size=4, kv_cache_tokens=16)
    events = []
    out = engine.generate([prompt(10, 50)], SamplingParams(max_new_tokens=20), on_event=events.append)[0]
    assert out.finish_reason == "length" and out.token_ids == full_recompute_greedy(model, prompt(10, 50), 7)
    assert events[-1].finished and engine.cache_stats()["blocks_held"] == 0


def test_samples_of_one_prompt_in_a_tiny_pool_with_prefix_caching():
    """Followers of a prefill that is preempted prefill themselves; every sample is still exact."""
    model = model_for(3, "plt")
    p = prompt(13, 60)
    engine = Engine(model, max_batch=3, block_size=4, kv_cache_tokens=32, max_step_tokens=5)
    assert run(engine, [p, p, p], 10) == [full_recompute_greedy(model, p, 10)] * 3
    stats = engine.cache_stats()
    assert stats["preemptions"] > 0 and stats["forks"] > 0 and stats["blocks_held"] == 0, stats


def test_abort_during_a_chunked_prefill_frees_its_blocks():
    model = model_for(2, "plt")
    engine = Engine(model, max_batch=2, block_size=4, max_step_tokens=6)
    long = engine.add_request(prompt(40, 70), SamplingParams(max_new_tokens=5))
    other = engine.add_request(prompt(7, 71), SamplingParams(max_new_tokens=8))
    for _ in range(3):
        engine.step()
    assert not long.output_ids and engine.cache_stats()["blocks_held"] > 0
    engine.abort(long.id)
    while engine.has_work():
        engine.step()
    assert long.finish_reason == "abort" and other.output_ids == full_recompute_greedy(model, other.prompt_ids, 8)
    assert engine.cache_stats()["blocks_held"] == 0


def test_static_shapes_with_paging_and_chunking_match_dynamic():
    model = model_for(3, "plt")
    prompts = [prompt(n, 30 + n) for n in (13, 5, 22)]
    kw = dict(max_batch=2, max_seq_len=40, block_size=4, max_step_tokens=5)
    assert run(Engine(model, static_shapes=True, **kw), prompts) == run(Engine(model, **kw), prompts)


def test_paged_memory_follows_real_lengths():
    model = model_for(2, "plt")
    engine = Engine(model, max_batch=4, max_seq_len=128, block_size=4)
    run(engine, [prompt(10, 40)], 5)  # 15 tokens: 4 blocks at the peak
    stats = engine.cache_stats()
    assert stats["peak_blocks_held"] == 4 and stats["blocks"] == 4 * 128 // 4


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(max_step_tokens=2, max_batch=2), "max_step_tokens must exceed max_batch"),
        (dict(block_size=0), "block_size must be >= 1"),
        (dict(kv_cache_tokens=4, block_size=4), "kv_cache_tokens must hold at least two blocks"),
        (dict(paged=False, prefix_caching=True), "prefix caching needs the paged cache"),
    ],
)
def test_bad_cache_options_are_one_line_errors(kwargs, message):
    with pytest.raises(LoopcoderError, match=message):
        Engine(model_for(2, "plt"), **kwargs)


def test_a_prompt_larger_than_the_pool_is_refused():
    engine = Engine(model_for(2, "plt"), block_size=4, kv_cache_tokens=16)
    with pytest.raises(LoopcoderError, match="the KV cache holds 16"):
        engine.add_request(prompt(16, 1), SamplingParams())


def test_preempting_a_prefill_sends_its_followers_back_without_starting_their_prefills():
    """A preempted leader's followers are queued with it: none attaches the prefix cache (or takes blocks) on the
    way out, and all three still get the exact tokens."""
    model = model_for(3, "plt")
    p = prompt(21, 80)
    engine = Engine(model, max_batch=3, block_size=4, max_step_tokens=8)
    reqs = [engine.add_request(p, SamplingParams(max_new_tokens=4)) for _ in range(3)]
    engine.step()
    leader = reqs[0]
    assert leader.state == "prefill" and [r.state for r in reqs[1:]] == ["follow", "follow"]
    queried = engine.cache_stats()["prefix_queried_tokens"]
    engine._preempt(leader)
    stats = engine.cache_stats()
    assert stats["prefix_queried_tokens"] == queried and stats["blocks_held"] == 0, stats
    assert engine.num_running == 0 and all(r.state == "waiting" and r.slot is None for r in reqs)
    while engine.has_work():
        engine.step()
    assert [r.output_ids for r in reqs] == [full_recompute_greedy(model, p, 4)] * 3
