"""The scheduler with the real engine's chunked prefill: a prompt that takes longer than the queue timeout to
prefill has its slot, so it is not timed out, and streams exactly the greedy tokens."""

from __future__ import annotations

import threading
import time

import torch

from loopcoder.inference.engine import Engine
from loopcoder.inference.sampling import SamplingParams
from loopcoder.serving.scheduler import Job, Scheduler
from support.models import full_recompute_greedy, tiny_model


class SlowEngine(Engine):
    def step(self):
        time.sleep(0.03)
        return super().step()


def test_a_long_chunked_prefill_is_not_a_queue_timeout():
    model = tiny_model(dtype=torch.float32, plt_num_loops=2, eos_token_id=None)
    engine = SlowEngine(model, max_batch=2, block_size=4, max_step_tokens=6)  # 6 prompt tokens a step
    scheduler = Scheduler(engine, max_queue=2, queue_timeout=0.3)  # the prefill takes longer
    scheduler.start()
    prompt = torch.randint(3, 61, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    updates, done = [], threading.Event()

    def deliver(u):
        updates.append(u)
        if u.finish_reason or u.error:
            done.set()

    try:
        scheduler.submit([Job(prompt, SamplingParams(max_new_tokens=4))], deliver)
        assert done.wait(30)
    finally:
        scheduler.begin_shutdown(0)
        scheduler.join(10)
    assert all(u.error is None for u in updates), [u.error for u in updates]
    assert [t for u in updates for t in u.token_ids] == full_recompute_greedy(model, prompt, 4)
    assert engine.cache_stats()["prefill_chunks"] >= 16  # 6 tokens a step: 17 steps, over 0.5 s
