"""Cost and accuracy of the vocabulary reduction (metrics.logp_entropy_from_logits) against the
LM-head matmul that produces its logits, and against a plain fp32 log-softmax (the baseline).

    python benchmarks/bench_metrics.py [--positions 256] [--hidden 576] [--runs 9]

Prints, per vocabulary size: median seconds of the head matmul, of the fp32 log-softmax
reduction and of ours, the reduction's cost as a fraction of the matmul, and the max error of
each against float64 on the same fp32 logits (synthetic logits of realistic scale, |z| <= 45).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from instructdiff_ray.metrics import logp_entropy_from_logits


def fp32_reduction(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lp = torch.log_softmax(z, -1)
    p = lp.exp()
    return lp.gather(-1, y[:, None]).squeeze(-1), -torch.where(p > 0, p * lp, 0.0).sum(-1)


def median_seconds(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positions", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=576, help="hidden size (576: SmolLM2-135M)")
    ap.add_argument("--runs", type=int, default=9)
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}, {a.positions} positions, hidden {a.hidden}")
    print("vocab    matmul_s  fp32_red_s  ours_s  ours/matmul  fp32_err_logp  fp32_err_H  ours_err_logp  ours_err_H")
    for vocab in (49_152, 152_064, 262_144):
        h = torch.randn(a.positions, a.hidden)
        w = torch.randn(vocab, a.hidden) / a.hidden**0.5 * 4
        y = torch.randint(0, vocab, (a.positions,))
        z = h @ w.T
        z[:, :20] += 15  # a few dominant tokens, as trained models have
        ref = torch.log_softmax(z.double(), -1)
        ref_lp, ref_h = ref.gather(-1, y[:, None]).squeeze(-1), -(ref.exp() * ref).sum(-1)
        err = lambda lp, ent: (float((lp.double() - ref_lp).abs().max()), float((ent.double() - ref_h).abs().max()))  # noqa: E731
        t_mm = median_seconds(lambda: h @ w.T, a.runs)
        t_old = median_seconds(lambda: fp32_reduction(z, y), a.runs)
        t_new = median_seconds(lambda: logp_entropy_from_logits(z, y), a.runs)
        e_old, e_new = err(*fp32_reduction(z, y)), err(*logp_entropy_from_logits(z, y))
        print(f"{vocab:<8} {t_mm:8.4f}  {t_old:10.4f}  {t_new:6.4f}  {t_new / t_mm:11.2f}  "
              f"{e_old[0]:13.2e}  {e_old[1]:10.2e}  {e_new[0]:13.2e}  {e_new[1]:10.2e}")


if __name__ == "__main__":
    main()
