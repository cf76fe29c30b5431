"""`loopcoder demo` (what `make demo` runs): the loop-count study on the embedded default data.

The tiny study preset: the depth probe (R = 1, PLT-2, PLT-3 and two controls on the permutation task,
three seeds each), then the code language model on the running Python's standard library sources. No
downloads, no GPU; docs/study.md has the measured time. Finished stages are cached, so running it
again only redoes what is missing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from loopcoder.commands.options import add_threads_argument
from loopcoder.commands.study import apply_study_threads


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/study", help="study directory")
    p.add_argument("--preset", default="tiny")
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    from loopcoder.study import Study, get_preset  # here: the study imports torch (fast --help)

    preset = get_preset(args.preset)
    apply_study_threads(preset, args.threads)
    report = Study(preset, args.out).run()
    summary = json.loads((Path(args.out) / "summary.json").read_text())
    depth = summary.get("depth")
    if depth:
        ks = depth["eval_lengths"]
        print(f"\nDepth probe: accuracy by number of steps k ({len(depth['seeds'])} seeds, held-out items for k >= 2)")
        print("  " + " " * 18 + "".join(f"{f'k={k}':>7}" for k in ks) + "  effective depth")
        for key, by_k in depth["accuracy"].items():
            name = depth["names"][key]
            print(
                f"  {name:<18}"
                + "".join(f"{100 * by_k[str(k)][0]:6.1f}%" for k in ks)
                + f"  {depth['effective_depth'][key]}"
            )
        for finding in depth["findings"]:
            print("  - " + finding.replace("**", ""))
    if "per_loop" in summary:
        print("\nCode language model (matched data, steps and seed; held-out evaluation):")
        for R, row in summary["per_loop"].items():
            print(
                f"  R={R}: bits/byte {row['bpb']:.3f}, HumanEval pass@1 {100 * row['humaneval']['pass@1']:.1f}%, "
                f"decode {row['cost']['latency_ms']['1']:.2f} ms/token"
            )
        for name, comp in summary["comparisons"].items():
            clear = [m for m, d in comp.items() if d["distinguishable"]]
            print(f"  {name}: {'distinguishable on ' + ', '.join(clear) if clear else 'within noise on every metric'}")
    print(f"\nreport: {report}")
    return 0
