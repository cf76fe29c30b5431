"""Count the operators (aten, mkldnn) of one decode step, per layer, with the torch profiler on CPU.

A decode step of PLT-R should launch about as many ops as R = 1's (all loop rows go through each op
together); each op is a kernel launch on a GPU, so this count is what keeps PLT-2 / R=1 near 1 there.
Per-layer count = (ops with 4 layers - ops with 2 layers) / 2; the rest is the step's fixed cost
(embedding, CLP rows, states, masks, lm_head; sampling is not included). "all" counts every operator
call, nested ones too; "top-level" the calls the step itself makes; "compute" those top-level calls that
are more than a view, an allocation or a no-op dtype cast (about the kernels a GPU would launch).

    PYTHONPATH=src python3 benchmarks/decode_ops.py [--batch 2] [--context 24] [--mode parallel]
"""

from __future__ import annotations

import argparse
import collections

import torch

from loopcoder.inference.engine import Engine
from loopcoder.inference.sampling import SamplingParams
from loopcoder.model.config import PLTConfig
from loopcoder.model.modeling import PLTForCausalLM

CONFIGS = {  # name: (loops, config overrides, engine mode)
    "R=1": (1, {}, "parallel"),
    "PLT-2": (2, {}, "parallel"),
    "PLT-4": (4, {}, "parallel"),
    "PLT-2 sequential": (2, {}, "sequential"),
    "vanilla-2": (2, {"loop_architecture": "vanilla"}, "parallel"),
    "no-offset-2": (2, {"plt_loop_offset": False}, "parallel"),
}


def step_ops(loops: int, layers: int, overrides: dict, mode: str, batch: int, context: int) -> tuple:
    """(ops, top-level ops, top-level ops that compute, Counter of those) of one decode step after a prefill."""
    torch.manual_seed(0)
    cfg = PLTConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        plt_num_loops=loops,
        plt_window_size=[8, 0],
        **overrides,
    )
    model = PLTForCausalLM(cfg).eval()
    engine = Engine(model, max_batch=batch, mode=mode)
    for b in range(batch):
        engine.add_request([1 + (b + i) % 100 for i in range(context)], SamplingParams(max_new_tokens=64))
    engine.step()  # prefill every request, then one decode step (warm-up)
    tokens = torch.arange(1, batch + 1)
    with torch.inference_mode():
        engine.decode_step(tokens, batch)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            engine.decode_step(tokens, batch)
    events = [e for e in prof.events() if _is_op(e)]
    top = [e for e in events if not _has_aten_parent(e)]
    compute = [e for e in top if not _only_views(e)]
    return len(events), len(top), len(compute), collections.Counter(e.name for e in compute)


# ops that only make a view, allocate, or return their input: no kernel of their own
VIEWS = {
    "aten::" + n
    for n in (
        "view",
        "as_strided",
        "alias",
        "empty",
        "empty_strided",
        "unsqueeze",
        "squeeze",
        "select",
        "slice",
        "transpose",
        "expand",
        "t",
        "permute",
        "detach",
        "reshape",
        "_reshape_alias",
        "flatten",
        "split_with_sizes",
        "split",
        "to",
        "lift_fresh",
        "result_type",
        "_unsafe_view",
        "chunk",
        "narrow",
        "unflatten",
    )
}


def _only_views(e) -> bool:
    return e.name in VIEWS and all(_only_views(c) for c in e.cpu_children if _is_op(c))


def _is_op(e) -> bool:
    """A dispatched operator (aten::, mkldnn::, ...), not a Python frame or a profiler marker."""
    return "::" in e.name and not e.name.startswith("ProfilerStep")


def _has_aten_parent(e) -> bool:
    p = e.cpu_parent
    while p is not None:
        if _is_op(p):
            return True
        p = p.cpu_parent
    return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--context", type=int, default=24)
    ap.add_argument("--names", action="store_true", help="list the top-level ops of one layer")
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(
        f"{'configuration':<18} {'per layer: all':>15} {'top-level':>10} {'compute':>8} "
        f"{'per step: all':>14} {'top-level':>10} {'compute':>8}"
    )
    for name, (loops, overrides, mode) in CONFIGS.items():
        small = step_ops(loops, 2, overrides, mode, a.batch, a.context)
        large = step_ops(loops, 4, overrides, mode, a.batch, a.context)
        per = [(x4 - x2) / 2 for x2, x4 in zip(small[:3], large[:3])]
        fixed = [x2 - 2 * p for x2, p in zip(small[:3], per)]
        print(f"{name:<18} {per[0]:>15g} {per[1]:>10g} {per[2]:>8g} {fixed[0]:>14g} {fixed[1]:>10g} {fixed[2]:>8g}")
        if a.names:
            n2, n4 = small[3], large[3]
            per_layer = sorted(((k, (n4[k] - n2[k]) / 2) for k in n4 if n4[k] != n2[k]), key=lambda kv: -kv[1])
            print("   ", ", ".join(f"{k.split('::')[-1]} {v:g}" for k, v in per_layer))


if __name__ == "__main__":
    main()
