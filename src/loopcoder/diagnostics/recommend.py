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

The rule is a heuristic about how the loops behave; held-out quality measures the models. With several
models, `check_held_out` compares the rule's pick with the model of lowest final-loop NLL on the same
samples (paired, 95 % interval): where the NLL says otherwise beyond noise, the headline says so and that
the held-out NLL is the one to believe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loopcoder.diagnostics.run import DiagnosticsResult
from loopcoder.utils.stats import Difference, mean_ci, paired_difference


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


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _json_difference(d: Difference) -> dict[str, Any]:
    """`Difference.to_dict` with null for the interval a single sample cannot give (JSON has no NaN)."""
    return {**d.to_dict(), "mean": _finite(d.mean), "ci95": [_finite(d.low), _finite(d.high)]}


@dataclass
class HeldOutCheck:
    """The rule's pick against held-out quality: the models' final-loop NLL on the same samples."""

    agrees: bool | None  # None: no model with the recommended R was diagnosed, nothing to compare
    best: str  # the model with the lowest held-out NLL
    best_loops: int
    nll: dict[str, float]  # model -> mean final-loop NLL (nats/token)
    difference: Difference | None  # recommended minus best, per sample (paired when the samples are the same)
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "agrees": self.agrees,
            "best": self.best,
            "best_loops": self.best_loops,
            "nll": {k: _finite(v) for k, v in self.nll.items()},
            "difference": None if self.difference is None else _json_difference(self.difference),
            "message": self.message,
        }


@dataclass
class Recommendation:
    loops: int
    reasons: list[str]
    per_model: dict[str, int] = field(default_factory=dict)  # model name -> its own verdict
    assessments: dict[str, list[LoopAssessment]] = field(default_factory=dict)
    held_out: HeldOutCheck | None = None  # with several models: does held-out NLL agree?

    @property
    def headline(self) -> str:
        """One line: the recommendation, and when held-out quality disagrees, that and which to believe."""
        h = self.held_out
        if h is None or h.agrees is not False:
            return f"R = {self.loops}"
        return (
            f"R = {self.loops} by the loop rule, but held-out NLL disagrees: R = {h.best_loops} ({h.best}) is "
            f"better. Believe the held-out NLL"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "loops": self.loops,
            "headline": self.headline,
            "reasons": self.reasons,
            "per_model": self.per_model,
            "assessments": {k: [a.to_dict() for a in v] for k, v in self.assessments.items()},
            "held_out": None if self.held_out is None else self.held_out.to_dict(),
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
    held_out = None
    if len(results) > 1:
        finals = sorted(results, key=lambda r: r.num_loops)
        nll = ", ".join(f"R={r.num_loops}: {r.stats('gold_nll')[-1].mean:.4g}" for r in finals)
        erank = ", ".join(f"R={r.num_loops}: {r.stats('effective_rank')[-1].mean:.4g}" for r in finals)
        reasons.append(f"final-loop gold NLL (nats) by model: {nll}; final-loop erank: {erank}")
        held_out = check_held_out(results, loops)
        reasons.append(held_out.message)
    return Recommendation(loops, reasons, per_model, assessments, held_out)


def _final_nll(result: DiagnosticsResult) -> np.ndarray:
    return result.values("gold_nll")[:, result.num_loops - 1]


def check_held_out(results: list[DiagnosticsResult], loops: int) -> HeldOutCheck:
    """Compare the rule's pick with the model of lowest held-out NLL (the final loop's gold-token NLL, what
    the model predicts). The rule reads how the loops behave; the NLL measures the model itself, so where they
    disagree beyond noise, the NLL is the one to believe."""
    nll = {r.name: float(np.nanmean(_final_nll(r))) for r in results}
    best = min(results, key=lambda r: nll[r.name])
    picked = [r for r in results if r.num_loops == loops]
    if not picked:
        return HeldOutCheck(
            None,
            best.name,
            best.num_loops,
            nll,
            None,
            f"held-out NLL cannot check R = {loops}: no such model was diagnosed (of those that were, "
            f"{best.name}, R = {best.num_loops}, has the lowest final-loop NLL, {nll[best.name]:.4g}); train one "
            "and diagnose it beside the others",
        )
    rec = min(picked, key=lambda r: nll[r.name])
    if rec is best or best.num_loops == loops:
        return HeldOutCheck(
            True,
            best.name,
            best.num_loops,
            nll,
            None,
            f"held-out NLL agrees: {best.name} (R = {loops}) has the lowest final-loop NLL ({nll[best.name]:.4g})",
        )
    a, b = _final_nll(best), _final_nll(rec)
    paired = len(a) == len(b) and best.num_tokens == rec.num_tokens  # the same samples, in the same order
    if paired:
        diff = paired_difference(a, b)
    else:  # other samples (another tokenizer): the two means and their intervals, not a paired test
        (ma, la, ha, _), (mb, lb, hb, _) = mean_ci(a), mean_ci(b)
        diff = Difference(mb - ma, lb - ha, hb - la, min(len(a), len(b)))
    versus = (
        f"{best.name} (R = {best.num_loops}) has a lower final-loop NLL than the recommended {rec.name} "
        f"(R = {loops}): {nll[best.name]:.4g} against {nll[rec.name]:.4g} nats/token, difference "
        f"{diff.describe(digits=3) if diff.n > 1 else f'{diff.mean:+.3f} (one sample: no interval)'}"
        f"{'' if paired else ', from different samples'}"
    )
    if diff.clear:
        return HeldOutCheck(
            False,
            best.name,
            best.num_loops,
            nll,
            diff,
            f"held-out NLL disagrees with the rule: {versus}. Believe the held-out NLL: it measures the model, "
            "the rule only reads how its loops behave",
        )
    return HeldOutCheck(
        None,
        best.name,
        best.num_loops,
        nll,
        diff,
        f"held-out NLL does not separate them: {versus}; more samples would tell",
    )
