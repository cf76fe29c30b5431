"""`loopcoder demo` (what `make demo` runs): the loop-count study on the embedded default data.

The tiny study preset on the running Python's standard library sources: no downloads, no GPU, about
12 minutes on 2 cores (measured from a fresh clone, set-up included). Finished stages are cached, so
running it again only redoes what is missing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loopcoder.commands.study import apply_study_threads
from loopcoder.runtime import add_threads_argument
from loopcoder.study import Study, get_preset


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/study", help="study directory")
    p.add_argument("--preset", default="tiny")
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    preset = get_preset(args.preset)
    apply_study_threads(preset, args.threads)
    report = Study(preset, args.out).run()
    summary = json.loads((Path(args.out) / "summary.json").read_text())
    print("\nLoop-count study (matched data, steps and seed; held-out evaluation):")
    for R, row in summary["per_loop"].items():
        rs = row["reasoning"]["overall"]
        print(f"  R={R}: reasoning {100 * rs['accuracy']:.1f}% [{100 * rs['ci95'][0]:.1f}, "
              f"{100 * rs['ci95'][1]:.1f}], answer NLL {rs['answer_nll']['mean']:.3f}, "
              f"bits/byte {row['bpb']:.3f}, HumanEval pass@1 {100 * row['humaneval']['pass@1']:.1f}%, "
              f"decode {row['cost']['latency_ms']['1']:.2f} ms/token")
    for name, comp in summary["comparisons"].items():
        clear = [m for m, d in comp.items() if d["distinguishable"]]
        print(f"  {name}: {'distinguishable on ' + ', '.join(clear) if clear else 'within noise on every metric'}")
    print(f"  recommended loop count: R={summary['recommended_loops']}")
    print(f"\nreport: {report}")
    return 0
