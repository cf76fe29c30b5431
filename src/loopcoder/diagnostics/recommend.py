"""The loop-count rule of LoopCoder-v2 (spec section 3), made operational.

"An extra loop is worth it while erank still rises; once erank falls, Delta p and attention KL
collapse, cos theta is negative and Omega stays flat, more loops only pay the offset cost."

For loop r >= 2 of a model (adding loop r on top of loop r - 1):
- erank trend: the paired (per-sample) difference erank(r) - erank(r-1) and its 95 % CI: "rises" if
  the CI is above 0, "falls" if below, otherwise "flat".
- stop signals: Delta p collapses (below `collapse_ratio` of the largest Delta p of the earlier loops
  >= 2; for loop 2, below `collapse_floor` nats), attention KL collapses (the same test), cos theta(r)
  < 0 (the update turns back: oscillation), Omega flat (|Omega(r) - Omega(r-1)| <= `flat_tolerance`
  x Omega(r-1); needs r >= 3).
- loop r is worth it if erank rises; not if it falls; if flat, worth it while fewer than half of the
  available stop signals hold.
A model's verdict is the number of loops before the first loop that is not worth it. Across several
models the verdict of the model with the most loops decides (it observes the most loops; a model can
never recommend more loops than it has); the others are reported as cross-checks, with the final-loop
gold NLL and erank of each R.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from loopcoder.diagnostics.run import DiagnosticsResult


@dataclass
class LoopAssessment:
    """Signals for adding loop `loop` on top of loop `loop - 1` in one model."""

    loop: int
    erank_trend: str  # "rises" | "falls" | "flat"
    erank_change: tuple[float, float, float]  # mean, CI low, CI high of erank(r) - erank(r-1)
    stop_signals: dict[str, bool | None]  # None: not available at this loop
    worth_it: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "loop": self.loop,
            "erank_trend": self.erank_trend,
            "erank_change": [None if not math.isfinite(x) else x for x in self.erank_change],
            "stop_signals": self.stop_signals,
            "worth_it": self.worth_it,
            "reason": self.reason,
        }


@dataclass
class Recommendation:
    loops: int
    reasons: list[str]
    per_model: dict[str, int] = field(default_factory=dict)  # model name -> its own verdict
    assessments: dict[str, list[LoopAssessment]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "loops": self.loops,
            "reasons": self.reasons,
            "per_model": self.per_model,
            "assessments": {k: [a.to_dict() for a in v] for k, v in self.assessments.items()},
        }


def _mean(result: DiagnosticsResult, key: str, loop: int) -> float:
    return result.stats(key)[loop - 1].mean


def _collapse(result: DiagnosticsResult, key: str, loop: int, ratio: float, floor: float) -> tuple[bool, str]:
    value = _mean(result, key, loop)
    if loop == 2:
        return value < floor, f"{value:.3g} nats (floor {floor:g})"
    ref = max(_mean(result, key, r) for r in range(2, loop))
    if not ref > 0:  # nothing to collapse from
        return value <= floor, f"{value:.3g} nats (earlier loops ≈ 0)"
    return value < ratio * ref, f"{value:.3g} nats, {value / ref:.0%} of the earlier peak {ref:.3g}"


def assess(
    result: DiagnosticsResult, collapse_ratio: float = 0.5, collapse_floor: float = 0.01, flat_tolerance: float = 0.10
) -> list[LoopAssessment]:
    """Apply the rule to each loop r = 2..R of one model."""
    out = []
    for r in range(2, result.num_loops + 1):
        d = result.paired_difference("effective_rank", r)
        e_prev, e_cur = _mean(result, "effective_rank", r - 1), _mean(result, "effective_rank", r)
        if math.isfinite(d.low):
            trend = "rises" if d.low > 0 else "falls" if d.high < 0 else "flat"
            ci = f"paired change {d.mean:+.3g}, 95 % CI [{d.low:+.3g}, {d.high:+.3g}]"
        else:  # one sample: no interval, the sign decides
            trend = "rises" if d.mean > 0 else "falls" if d.mean < 0 else "flat"
            ci = f"change {d.mean:+.3g}, one sample: no CI"
        dp_c, dp_txt = _collapse(result, "delta_p", r, collapse_ratio, collapse_floor)
        kl_c, kl_txt = _collapse(result, "attention_kl", r, collapse_ratio, collapse_floor)
        cos = _mean(result, "update_cosine", r)
        signals: dict[str, bool | None] = {
            "delta_p_collapses": dp_c,
            "attention_kl_collapses": kl_c,
            "cos_theta_negative": bool(cos < 0),
            "omega_flat": None,
        }
        om_txt = ""
        if r >= 3:
            om_prev, om = _mean(result, "offset_cost", r - 1), _mean(result, "offset_cost", r)
            rel = (om - om_prev) / om_prev if om_prev > 0 else math.inf
            signals["omega_flat"] = bool(abs(rel) <= flat_tolerance)
            om_txt = f"Ω {om_prev:.3g} → {om:.3g} ({rel:+.0%})"
        held = [k for k, v in signals.items() if v]
        available = sum(v is not None for v in signals.values())
        worth = trend == "rises" or (trend == "flat" and len(held) < available / 2)
        words = {
            "delta_p_collapses": f"Δp collapses ({dp_txt})",
            "attention_kl_collapses": f"attention KL collapses ({kl_txt})",
            "cos_theta_negative": f"cos θ = {cos:.2f} < 0 (the update turns back)",
            "omega_flat": f"Ω flat ({om_txt})",
        }
        stop = "; stop signals: " + ", ".join(words[k] for k in held) if held else "; no stop signal"
        reason = (
            f"loop {r}: erank {trend} {e_prev:.4g} → {e_cur:.4g} ({ci}){stop}"
            f" → {'worth it' if worth else 'not worth it'}"
        )
        out.append(LoopAssessment(r, trend, (d.mean, d.low, d.high), signals, worth, reason))
    return out


def verdict(assessments: list[LoopAssessment]) -> int:
    """Loops before the first one that is not worth it."""
    loops = 1
    for a in assessments:
        if not a.worth_it:
            break
        loops = a.loop
    return loops


def recommend(results: list[DiagnosticsResult], **rule: float) -> Recommendation:
    """The recommended loop count and, in words, the signals that drove it (see the module doc)."""
    if not results:
        raise ValueError("recommend() needs at least one DiagnosticsResult")
    assessments = {r.name: assess(r, **rule) for r in results}
    per_model = {r.name: verdict(assessments[r.name]) for r in results}
    primary = max(results, key=lambda r: r.num_loops)  # the first of the largest R
    if primary.num_loops == 1:
        why = (
            "only R = 1 models: there is no loop r ≥ 2 to assess, so the rule cannot argue for more "
            "loops; diagnose a model with R ≥ 2"
        )
        return Recommendation(1, [why], per_model, assessments)
    loops = per_model[primary.name]
    reasons = [f"{primary.name} (R = {primary.num_loops}) has the most loops and decides:"]
    reasons += [a.reason for a in assessments[primary.name]]
    if loops == primary.num_loops:
        reasons.append(f"every loop of {primary.name} still pays off: a larger R may too (diagnose one)")
    else:
        reasons.append(f"loops beyond {loops} only pay the offset cost → recommend R = {loops}")
    for r in results:
        if r is primary or r.num_loops == 1:
            continue
        v = per_model[r.name]
        agree = (
            "agrees"
            if v == loops
            else "cannot see further (all its loops pay off)"
            if v == r.num_loops < loops
            else "disagrees"
        )
        reasons.append(f"cross-check {r.name} (R = {r.num_loops}): its own loops give {v} ({agree})")
    if len(results) > 1:
        finals = sorted(results, key=lambda r: r.num_loops)
        nll = ", ".join(f"R={r.num_loops}: {r.stats('gold_nll')[-1].mean:.4g}" for r in finals)
        erank = ", ".join(f"R={r.num_loops}: {r.stats('effective_rank')[-1].mean:.4g}" for r in finals)
        reasons.append(f"final-loop gold NLL (nats) by model: {nll}; final-loop erank: {erank}")
    return Recommendation(loops, reasons, per_model, assessments)
