"""Loop diagnostics (LoopCoder-v2 spec section 3): why two loops win and more regress.

Python API (the CLI `loopcoder diagnose` is a thin wrapper):

    result = diagnose(model, sequences, samples=500, name="R2")   # one DiagnosticsResult per model
    rec = recommend([r1, r2, r3])                                  # Recommendation(loops, reasons)
    write_report([r1, r2, r3], "out/")                             # JSON + markdown + PNG plots

`measures` holds the formulas as pure tensor functions, `probe.LoopProbe` the streaming collector
attached through `PLTModel.probed`. Definitions: docs/diagnostics.md.
"""

from loopcoder.diagnostics.probe import LoopProbe
from loopcoder.diagnostics.recommend import LoopAssessment, Recommendation, assess, recommend
from loopcoder.diagnostics.report import write_report
from loopcoder.diagnostics.run import MEASURES, DiagnosticsResult, Stat, diagnose, extra_loop, load_sequences

__all__ = [
    "MEASURES",
    "DiagnosticsResult",
    "LoopAssessment",
    "LoopProbe",
    "Recommendation",
    "Stat",
    "assess",
    "diagnose",
    "extra_loop",
    "load_sequences",
    "recommend",
    "write_report",
]
