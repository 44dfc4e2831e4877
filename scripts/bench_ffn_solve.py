#!/usr/bin/env python
"""How long the FFN assignment takes, by path, against the float32 GEMM it avoids (same run).

    python scripts/bench_ffn_solve.py                 # 1B's FFN: 5632 neurons, rows of 6144
    python scripts/bench_ffn_solve.py --neurons 2048 --width 2304

Rows of two models at three distances -- a fine-tune (B = A + 5 % noise), a far relative (+50 %,
spread evenly over the row, where the prefix bounds do not settle) and unrelated rows -- are
solved by `solve_permutation` on two worker threads at once (as `rotfuse match` runs layers),
and so is the float32 score GEMM alone; the table gives seconds per solve and the ratio to that
GEMM. Which path settled each case is printed too: the ratios say nothing without it. Where the
bfloat16 filter settles a case, the same case is solved again with it switched off; where the
sparse solve does (unrelated rows), the same case is solved with it off (the dense Hungarian) and
then with it on again, so that a drift of the machine's speed shows.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from rotfuse.symmetry import permutation
from rotfuse.symmetry.permutation import (
    SPARSE_MIN_SIZE,
    best_assignment,
    bounded_row_bests,
    certified_sparse_assignment,
    fast_bfloat16_gemm,
    filtered_row_bests,
    prefix_may_settle,
    solve_permutation,
)

WORKERS = 2


def float32_path(src: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """The path unrelated rows took before the bfloat16 sparse solve: every prefix pass and the
    filter give up, then the float32 score GEMM and `best_assignment` (sparse, or dense Hungarian)."""
    assert bounded_row_bests(src, anchor) is None
    assert not fast_bfloat16_gemm(anchor.device) or filtered_row_bests(src, anchor) is None
    return best_assignment(src @ anchor.T)


def per_solve_seconds(job, cases: list[torch.Tensor], anchor: torch.Tensor) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(lambda src: job(src, anchor), cases))
    return (time.perf_counter() - start) * WORKERS / len(cases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=5632)
    parser.add_argument("--width", type=int, default=6144)
    parser.add_argument("--repeat", type=int, default=2, help="solves per case and worker; the mean counts")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one per worker thread, as rotfuse splits them
    g = torch.Generator().manual_seed(0)
    anchor = torch.randn(args.neurons, args.width, generator=g) / args.width**0.5

    def relative(noise: float | None) -> torch.Tensor:
        fresh = torch.randn(args.neurons, args.width, generator=g) / args.width**0.5
        src = fresh if noise is None else anchor + noise * fresh
        return src[torch.randperm(args.neurons, generator=g)]

    cases = {"fine-tune (+5 %)": 0.05, "far relative (+50 %)": 0.5, "unrelated": None}
    gemm = per_solve_seconds(lambda src, a: src @ a.T, [relative(0.05)] * (WORKERS * args.repeat), anchor)
    print(
        f"{args.neurons} neurons x {args.width}, {WORKERS} worker threads, bf16 filter: "
        f"{'on' if fast_bfloat16_gemm(anchor.device) else 'off (no AMX / AVX512-BF16)'}"
    )
    print("| case | path | s per solve | x float32 GEMM |\n|---|---|---:|---:|")
    print(f"| - | float32 score GEMM alone (baseline) | {gemm:.2f} | 1.00 |")
    for name, noise in cases.items():
        sources = [relative(noise) for _ in range(WORKERS)] * args.repeat
        if prefix_may_settle(sources[0], anchor) and bounded_row_bests(sources[0], anchor) is not None:
            path = "prefix bounds"
        elif fast_bfloat16_gemm(anchor.device) and filtered_row_bests(sources[0], anchor) is not None:
            path = "bfloat16 filter"
        elif torch.unique((sources[0] @ anchor.T).argmax(dim=1)).numel() == args.neurons:
            path = "float32 GEMM + certificate"
        elif fast_bfloat16_gemm(anchor.device) and args.neurons >= SPARSE_MIN_SIZE:
            path = "bfloat16 GEMM + sparse solve + LP-duality certificate"
        elif args.neurons >= SPARSE_MIN_SIZE and certified_sparse_assignment(sources[0] @ anchor.T) is not None:
            path = "float32 GEMM + sparse solve + LP-duality certificate"
        else:
            path = "float32 GEMM + Hungarian"
        seconds = per_solve_seconds(solve_permutation, sources, anchor)
        print(f"| {name} | {path} | {seconds:.2f} | {seconds / gemm:.2f} |")
        if "sparse" in path:
            # the paths it replaces, same run (best_assignment looks the sparse solve up per call)
            first = seconds
            if path.startswith("bfloat16"):
                old = per_solve_seconds(float32_path, sources, anchor)
                print(f"| {name}, previous | float32 GEMM + sparse solve | {old:.2f} | {old / gemm:.2f} |")
            permutation.certified_sparse_assignment = lambda scores, candidates=0: None
            try:
                dense = sources[:WORKERS] if args.neurons > 3000 else sources  # one O(n^3) solve per worker
                old = per_solve_seconds(float32_path, dense, anchor)
            finally:
                permutation.certified_sparse_assignment = certified_sparse_assignment
            seconds = per_solve_seconds(solve_permutation, sources, anchor)  # again, after: drift shows
            print(f"| {name}, sparse off | float32 GEMM + Hungarian | {old:.2f} | {old / gemm:.2f} |")
            print(f"| {name}, again | {path} | {seconds:.2f} | {seconds / gemm:.2f} |")
            print(f"{name}: Hungarian / this path = {old / min(first, seconds):.2f}")
        if path == "bfloat16 filter":
            permutation.fast_bfloat16_gemm = lambda device: False  # solve_permutation looks it up per call
            try:
                seconds = per_solve_seconds(solve_permutation, sources, anchor)
            finally:
                permutation.fast_bfloat16_gemm = fast_bfloat16_gemm
            print(f"| {name} | filter off: float32 GEMM + certificate | {seconds:.2f} | {seconds / gemm:.2f} |")


if __name__ == "__main__":
    main()
