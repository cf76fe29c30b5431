"""`LoopProbe`: the streaming collector attached with `PLTModel.probed(probe)`.

The model calls `attention(layer_idx, loop, branch, probs, gate)` from every attention branch and
`loop_output(loop, h)` after every loop (loops 0-based). The probe turns each call into a few
per-sample numbers at once and keeps only what a later call still needs: the last two hidden states,
the previous loop's log-probabilities (S x V) and, per layer, the previous loop's attention
probabilities of the branch the inter-loop KL compares. Nothing of a finished sample is kept but its
scalars (and running sums for the head-similarity heatmaps and gate histograms), so memory does not
grow with the number of samples.

Which attention branch is which (spec 1.2 and `docs/diagnostics.md`):
- loop 1, and every loop of a vanilla looped model: "causal", over its own keys;
- PLT loops >= 2: "global" attends over loop 1's keys with the same causal mask as loop 1, so its
  distributions are comparable with the previous loop's over the same keys: it is the *primary*
  branch (entropy, KL, head diversity). "local" (the window over the loop's own keys) is reported on
  its own rows; its call carries the gate.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from loopcoder.diagnostics import measures as M

GATE_BINS = 50  # histogram bins over [0, 1] for the gate distributions


class LoopProbe:
    """Collects the per-loop diagnostics of one model, one sample (batch of 1) at a time.

    Usage: `probe.begin(input_ids)`, one forward of the model with `num_loops + 1` loops inside
    `model.model.probed(probe)` (the extra loop gives the fixed-point gap of the last loop; see
    `run.extra_loop`), then `probe.end()` returns the sample's arrays.
    """

    def __init__(self, model: Any) -> None:
        cfg = model.config
        self.model = model
        self.R = cfg.plt_num_loops
        self.L = cfg.num_hidden_layers
        self.H = cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        # Running sums over samples (small: L x R x H x H and L x R x bins).
        self.head_cos_sum = np.zeros((self.L, self.R, self.H, self.H))
        self.head_cos_count = np.zeros((self.L, self.R))
        self.gate_hist = np.zeros((self.L, self.R, GATE_BINS))
        self._active = False

    # ------------------------------------------------------------------ per sample
    def begin(self, input_ids: torch.Tensor) -> None:
        """Start a sample: input_ids (1, S)."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"the probe takes one sample at a time, got input_ids of shape {tuple(input_ids.shape)}")
        R, L, H = self.R, self.L, self.H
        self.ids = input_ids[0]
        self.S = int(input_ids.shape[1])
        nan = lambda *shape: np.full(shape, math.nan)
        self.cur = {
            # hidden states, index r-1 = loop r
            "step_size": nan(R),
            "update_cosine": nan(R),
            "effective_rank": nan(R),
            "fixed_point_gap": nan(R),
            "offset_cost": nan(R),
            # attention, primary branch (causal / global) and PLT's local branch
            "attention_entropy": nan(L, H, R),
            "attention_kl": nan(L, R),
            "head_cosine": nan(L, R),
            "head_effective_rank": nan(L, R),
            "local_attention_entropy": nan(L, H, R),
            "local_head_cosine": nan(L, R),
            "local_head_effective_rank": nan(L, R),
            "gate": nan(L, H, R),
            # output (logit lens)
            "output_entropy": nan(R),
            "gold_rank": nan(R),
            "gold_top1": nan(R),
            "gold_nll": nan(R),
            "delta_p": nan(R),
        }
        with torch.no_grad():  # h(0): the input of loop 1, B(1) = E (spec 1.1)
            emb = self.model.model.embed_tokens(input_ids)
        self._hidden: dict[int, torch.Tensor] = {0: emb[0].detach().float()}
        self._prev_attn: dict[int, torch.Tensor] = {}
        self._prev_logprobs: torch.Tensor | None = None
        self._delta_p_tokens: list[torch.Tensor] = []  # per loop r >= 2: Delta p per position (S,)
        self._seen_loops: set[int] = set()
        self.final_logits: torch.Tensor | None = None
        self._active = True

    def end(self) -> dict[str, np.ndarray]:
        """Finish the sample: derived shares and peak-loop fractions; returns the sample's arrays."""
        if not self._active:
            raise RuntimeError("end() without begin()")
        # the extra loop R + 1 is optional: without it loop R's fixed-point gap stays NaN
        missing = set(range(self.R)) - self._seen_loops
        if missing:
            raise RuntimeError(f"the forward did not report loop(s) {sorted(missing)}")
        c, R = self.cur, self.R
        c["delta_p_share"] = np.full(R, math.nan)
        c["attention_kl_share"] = np.full(R, math.nan)
        c["peak_loop_fraction"] = np.full(R, math.nan)
        if R > 1:
            c["delta_p_share"][1:] = M.shares(c["delta_p"][1:])
            c["attention_kl_share"][1:] = M.shares(np.nanmean(c["attention_kl"][:, 1:], axis=0))
            peak = M.peak_loop(torch.stack(self._delta_p_tokens))  # loop numbers 2..R, (S,)
            counts = torch.bincount(peak - 2, minlength=R - 1).double() / peak.numel()
            c["peak_loop_fraction"][1:] = counts.numpy()
        self._hidden, self._prev_attn, self._prev_logprobs, self._delta_p_tokens = {}, {}, None, []
        self._active = False
        return {k: np.asarray(v, dtype=np.float64) for k, v in c.items()}

    # ------------------------------------------------------------------ hooks called by the model
    def attention(self, layer_idx: int, loop: int, branch: str, probs: torch.Tensor, gate: torch.Tensor | None) -> None:
        """probs (1, H, S, T) fp32 of one layer / loop / branch; gate (1, H, S, 1) or None."""
        if not self._active or loop >= self.R:  # the extra loop only serves the fixed-point gap
            return
        r, li, p = loop + 1, layer_idx, probs[0].detach()
        c = self.cur
        if branch == "local":
            c["local_attention_entropy"][li, :, loop] = M.attention_entropy(p).cpu().numpy()
            _, mean_cos, erank = M.head_similarity(p)
            c["local_head_cosine"][li, loop], c["local_head_effective_rank"][li, loop] = mean_cos, erank
            if gate is not None:
                g = gate[0, :, :, 0].detach().float()
                c["gate"][li, :, loop] = g.mean(-1).cpu().numpy()
                self.gate_hist[li, loop] += torch.histc(g, GATE_BINS, 0.0, 1.0).cpu().double().numpy()
            return
        # primary branch: "causal" (loop 1, vanilla loops) or "global" (PLT loops >= 2)
        c["attention_entropy"][li, :, loop] = M.attention_entropy(p).cpu().numpy()
        cos, mean_cos, erank = M.head_similarity(p)
        c["head_cosine"][li, loop], c["head_effective_rank"][li, loop] = mean_cos, erank
        self.head_cos_sum[li, loop] += cos.cpu().double().numpy()
        self.head_cos_count[li, loop] += 1
        if r >= 2 and li in self._prev_attn:
            c["attention_kl"][li, loop] = M.attention_kl(p, self._prev_attn[li])
        self._prev_attn[li] = p  # the model drops its reference; this is the only copy kept

    def loop_output(self, loop: int, h: torch.Tensor) -> None:
        """h (1, S, hidden): the raw output h(r) of loop r = loop + 1."""
        if not self._active:
            return
        self._seen_loops.add(loop)
        r, c = loop + 1, self.cur
        hf = h[0].detach().float()
        if r == self.R + 1:  # the extra loop: f(h(R))
            c["fixed_point_gap"][self.R - 1] = M.fixed_point_gap(self._hidden[self.R], hf)
            return
        c["effective_rank"][loop] = M.hidden_effective_rank(hf, self.eps)
        if r >= 2:
            prev, prev2 = self._hidden[r - 1], self._hidden[r - 2]
            c["step_size"][loop] = M.step_size(hf, prev)
            c["update_cosine"][loop] = M.update_cosine(hf, prev, prev2)
            c["offset_cost"][loop] = M.offset_cost(prev)
            c["fixed_point_gap"][loop - 1] = c["step_size"][loop]  # f(h(r-1)) = h(r): the same distance
        self._hidden[r] = hf
        self._hidden.pop(r - 2, None)  # keep h(r-1) and h(r) only
        self._logit_lens(loop, h)

    # ------------------------------------------------------------------ output
    def _logit_lens(self, loop: int, h: torch.Tensor) -> None:
        """p(r) = softmax(lm_head(N(h(r)))), computed exactly as the model computes its logits."""
        model, c = self.model, self.cur
        with torch.no_grad():
            logits = model.lm_head(model.model.norm(h))[0].float()
        logprobs = torch.log_softmax(logits, -1)
        c["output_entropy"][loop] = M.output_entropy(logprobs).mean().item()
        if self.S > 1:
            gold = self.ids[1:].to(logits.device)
            rank = M.gold_rank(logits[:-1], gold)
            c["gold_rank"][loop] = rank.double().mean().item()
            c["gold_top1"][loop] = (rank == 1).double().mean().item()
            c["gold_nll"][loop] = -logprobs[:-1].gather(-1, gold[:, None]).mean().item()
        if self._prev_logprobs is not None:
            dp = M.output_kl(logprobs, self._prev_logprobs)
            c["delta_p"][loop] = dp.mean().item()
            self._delta_p_tokens.append(dp.cpu())
        self._prev_logprobs = logprobs
        if loop == self.R - 1:
            self.final_logits = logits  # what the model itself outputs (checked bit-exact by the tests)
