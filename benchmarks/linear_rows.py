"""Why `FastLinear` prepacks weights on CPU: the cost of one fp32 linear for M = 1..8 input rows, with
torch's default (MKL sgemm) and with the oneDNN-prepacked weight, measured side by side.

    PYTHONPATH=src python3 benchmarks/linear_rows.py [--in 1024 --out 5504]

A decode step with R loop rows per token is M = R (times the batch). If a matmul's cost grows with M at
small M, every loop pays for the weight read again, which is what single-pass decoding exists to avoid.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from loopcoder.model.fastlinear import FastLinear, can_pack


def timed(fn, x: torch.Tensor, reps: int) -> float:
    for _ in range(5):
        fn(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--in", dest="d_in", type=int, default=1024)
    ap.add_argument("--out", dest="d_out", type=int, default=5504)
    ap.add_argument("--reps", type=int, default=200)
    a = ap.parse_args()
    torch.manual_seed(0)
    lin = torch.nn.Linear(a.d_in, a.d_out, bias=False)
    if not can_pack(lin.weight):
        raise SystemExit("oneDNN prepacking is not available here")
    fast = FastLinear([lin], pack=True)
    print(
        f"{torch.get_num_threads()} threads, weight {a.d_out} x {a.d_in} fp32 "
        f"({lin.weight.numel() * 4 / 2**20:.1f} MiB)"
    )
    print(f"{'rows M':>7}{'sgemm us':>10}{'x M=1':>7}{'oneDNN us':>11}{'x M=1':>7}")
    base = {}
    with torch.no_grad():
        for m in (1, 2, 3, 4, 8):
            x = torch.randn(m, a.d_in)
            t_mkl = timed(lambda v: F.linear(v, lin.weight), x, a.reps)
            t_dnn = timed(fast, x, a.reps)
            base.setdefault("mkl", t_mkl)
            base.setdefault("dnn", t_dnn)
            print(
                f"{m:>7}{t_mkl * 1e6:>10.0f}{t_mkl / base['mkl']:>7.2f}{t_dnn * 1e6:>11.0f}{t_dnn / base['dnn']:>7.2f}"
            )


if __name__ == "__main__":
    main()
