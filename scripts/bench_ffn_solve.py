#!/usr/bin/env python
"""How long the FFN assignment takes, by path, against the float32 GEMM it avoids (same run).

    python scripts/bench_ffn_solve.py                 # 1B's FFN: 5632 neurons, rows of 6144
    python scripts/bench_ffn_solve.py --neurons 2048 --width 2304

Rows of two models at three distances -- a fine-tune (B = A + 5 % noise), a far relative (+50 %,
spread evenly over the row, which only a wider prefix of the columns settles) and unrelated rows --
and a fine-tune of an anchor whose neurons' norms are uneven, as a trained model's are (log-normal,
sigma UNEVEN_SPREAD: the middle 98 % within a factor 2 of the median; also solved without the
certificate's column potentials, as before them, in the same run) are solved by `solve_permutation`
on two worker threads at once (as `rotfuse match` runs layers; `--workers 1`: each solve alone),
and so is the float32 score GEMM alone; the table gives seconds per solve and the ratio to that
GEMM. Which path settled each case is printed too: the ratios say nothing without it. Where the
bfloat16 filter settles a case, the same case is solved again with it switched off; where the
sparse solve does (unrelated rows), the same case is solved with it off (the dense Hungarian),
the way issue 18 found it (the prefix passes and the filter giving up, then the float32 GEMM and
the dense Hungarian: its target is 3x faster than that) and then with it on again, so that a drift
of the machine's speed shows; the bfloat16 sparse path is also timed holding whole float64 copies
of both sides (as it did before it worked in EXACT_BYTES blocks). With fast bfloat16, each case is
also solved on its rows rounded to bfloat16, read as they are (as `match` reads a bf16
checkpoint's). `--peak-rss` adds, per path, the peak memory one solve of unrelated rows adds to
its inputs, each in a process of its own.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from rotfuse.symmetry import permutation
from rotfuse.symmetry.permutation import (
    EXACT_BYTES,
    SPARSE_MIN_SIZE,
    best_assignment,
    bounded_row_bests,
    certified_sparse_assignment,
    distance_potentials,
    fast_bfloat16_gemm,
    filtered_row_bests,
    first_prefix,
    int8_gemm_available,
    solve_permutation,
)

WORKERS = 2  # as `rotfuse match` runs layers (--workers changes it: 1 shows a solve alone)
UNEVEN_SPREAD = 0.3  # sigma of the log of the uneven case's neuron norms (MiniLM's span a factor 2-6)
PEAK_PATHS: dict[str, dict[str, object]] = {  # module attributes of `permutation` set for the path
    "bfloat16 sparse solve": {},
    "bfloat16 sparse solve, whole float64 copies": {"EXACT_BYTES": 2**62},
    "previous: float32 GEMM + sparse solve": {"fast_bfloat16_gemm": lambda device: False},
}


def float32_path(src: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """The path unrelated rows took before the bfloat16 sparse solve, once the prefix passes and
    the filter had given up (timed without them: `check_float32_path`): the float32 score GEMM and
    `best_assignment` (sparse, or dense Hungarian)."""
    return best_assignment(src @ anchor.T)


def starting_path(src: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """The path unrelated rows took when issue 18 set its target (3x faster than it): the prefix
    passes from 1/32 of the columns until they give up, the bfloat16 filter where the CPU has it,
    then the float32 score GEMM and the dense Hungarian (the caller switches the sparse solve off).
    Today's versions of the passes and the filter: if anything, faster than they were then."""
    best = bounded_row_bests(src, anchor)
    if best is None and fast_bfloat16_gemm(src.device):
        best = filtered_row_bests(src, anchor)
    return float32_path(src, anchor) if best is None else torch.argsort(best)


def check_float32_path(src: torch.Tensor, anchor: torch.Tensor) -> None:
    """That the rows timed by `float32_path` are ones the prefix passes and the filter give up on."""
    assert bounded_row_bests(src, anchor) is None
    assert not fast_bfloat16_gemm(anchor.device) or filtered_row_bests(src, anchor) is None


def per_solve_seconds(job, cases: list[torch.Tensor], anchor: torch.Tensor, workers: int = WORKERS) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda src: job(src, anchor), cases))
    return (time.perf_counter() - start) * workers / len(cases)


def peak_rss_child(path: str, neurons: int, width: int) -> None:
    """One solve of unrelated rows by `path`: prints the MiB its peak RSS adds to the inputs'."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    anchor = torch.randn(neurons, width, generator=g).div_(width**0.5)  # in place: no temporaries
    src = torch.randn(neurons, width, generator=g).div_(width**0.5)
    for name, value in PEAK_PATHS[path].items():
        setattr(permutation, name, value)
    import scipy.optimize  # (the libraries' own memory is not the solve's)
    import scipy.sparse.csgraph  # noqa: F401

    solve_permutation(src[:64], anchor[:64])  # torch's and oneDNN's first-call state too
    # the peak RSS (VmHWM) restarts from the current one: a child's ru_maxrss would start from its parent's
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    solve_permutation(src, anchor)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    print(f"{(peak - before) / 2**10:.0f} {seconds:.2f}")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_rss(neurons: int, width: int) -> None:
    print(f"\npeak RSS one solve of unrelated rows adds to its inputs ({2 * neurons * width * 4 / 2**20:.0f} MiB):")
    print("| path | extra peak MiB | s (one thread) |\n|---|---:|---:|")
    for path in PEAK_PATHS:
        args = [sys.executable, __file__, "--peak-child", path, "--neurons", str(neurons), "--width", str(width)]
        extra, seconds = subprocess.run(args, check=True, capture_output=True, text=True).stdout.split()
        print(f"| {path} | {extra} | {seconds} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neurons", type=int, default=5632)
    parser.add_argument("--width", type=int, default=6144)
    parser.add_argument("--repeat", type=int, default=2, help="solves per case and worker; the mean counts")
    parser.add_argument("--peak-rss", action="store_true", help="also the peak memory per path (processes)")
    parser.add_argument("--cases", default="fine-tune,far,unrelated,uneven", help="which row pairs (comma-separated)")
    parser.add_argument("--workers", type=int, default=WORKERS, help="solves at once, one thread each")
    parser.add_argument("--peak-child", choices=list(PEAK_PATHS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_child:
        return peak_rss_child(args.peak_child, args.neurons, args.width)
    workers = max(1, args.workers)
    torch.set_num_threads(1)  # one per worker thread, as rotfuse splits them
    g = torch.Generator().manual_seed(0)
    anchor = torch.randn(args.neurons, args.width, generator=g) / args.width**0.5

    norms = torch.exp(UNEVEN_SPREAD * torch.randn(args.neurons, 1, generator=g))
    anchors = {False: anchor, True: anchor * norms}

    def relative(noise: float | None, uneven: bool = False) -> torch.Tensor:
        fresh = torch.randn(args.neurons, args.width, generator=g) / args.width**0.5
        src = fresh if noise is None else anchors[uneven] + noise * fresh * (norms if uneven else 1)
        return src[torch.randperm(args.neurons, generator=g)]

    all_cases = {
        "fine-tune (+5 %)": (0.05, False),
        "far relative (+50 %)": (0.5, False),
        "unrelated": (None, False),
        "uneven norms, fine-tune (+5 %)": (0.05, True),
    }
    chosen = args.cases.split(",")
    cases = {name: case for name, case in all_cases.items() if name.split()[0].rstrip(",") in chosen}
    gemm = per_solve_seconds(lambda src, a: src @ a.T, [relative(0.05)] * (workers * args.repeat), anchor, workers)
    print(
        f"{args.neurons} neurons x {args.width}, {workers} worker threads, bf16 filter: "
        f"{'on' if fast_bfloat16_gemm(anchor.device) else 'off (no AMX / AVX512-BF16)'}, "
        f"prefix passes' GEMM: {permutation.prefix_gemm(anchor.device)}"
    )
    print("| case | path | s per solve | x float32 GEMM |\n|---|---|---:|---:|")
    print(f"| - | float32 score GEMM alone (baseline) | {gemm:.2f} | 1.00 |")
    for name, (noise, uneven) in cases.items():
        anchor = anchors[uneven]
        sources = [relative(noise, uneven) for _ in range(workers)] * args.repeat
        start = first_prefix(sources[0], anchor)
        if start is not None and bounded_row_bests(sources[0], anchor, start) is not None:
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
        seconds = per_solve_seconds(solve_permutation, sources, anchor, workers)
        print(f"| {name} | {path} | {seconds:.2f} | {seconds / gemm:.2f} |")
        if fast_bfloat16_gemm(anchor.device):  # as `match` solves a bf16 checkpoint's rows: no float32 copy
            stored = per_solve_seconds(solve_permutation, [s.bfloat16() for s in sources], anchor.bfloat16(), workers)
            print(f"| {name}, rows in bfloat16 | the same, read as stored | {stored:.2f} | {stored / gemm:.2f} |")
        if "sparse" in path:
            # the paths it replaces, same run (best_assignment looks the sparse solve up per call)
            first = seconds
            check_float32_path(sources[0], anchor)
            if path.startswith("bfloat16"):
                old = per_solve_seconds(float32_path, sources, anchor, workers)
                print(f"| {name}, previous | float32 GEMM + sparse solve | {old:.2f} | {old / gemm:.2f} |")
            permutation.certified_sparse_assignment = lambda scores, candidates=0: None
            try:
                dense = sources[:workers] if args.neurons > 3000 else sources  # one O(n^3) solve per worker
                old = per_solve_seconds(float32_path, dense, anchor, workers)
                start = per_solve_seconds(starting_path, dense, anchor, workers)
            finally:
                permutation.certified_sparse_assignment = certified_sparse_assignment
            if path.startswith("bfloat16"):
                permutation.EXACT_BYTES = 2**62  # one block: whole float64 copies of both sides
                try:
                    whole = per_solve_seconds(solve_permutation, sources, anchor, workers)
                finally:
                    permutation.EXACT_BYTES = EXACT_BYTES
                print(f"| {name}, whole float64 copies | {path} | {whole:.2f} | {whole / gemm:.2f} |")
            seconds = per_solve_seconds(solve_permutation, sources, anchor, workers)  # again, after: drift shows
            print(f"| {name}, sparse off | float32 GEMM + Hungarian | {old:.2f} | {old / gemm:.2f} |")
            print(f"| {name}, again | {path} | {seconds:.2f} | {seconds / gemm:.2f} |")
            path_then = "prefix passes + filter + float32 GEMM + Hungarian"
            print(f"| {name}, issue 18's start | {path_then} | {start:.2f} | {start / gemm:.2f} |")
            print(f"{name}: Hungarian / this path = {old / min(first, seconds):.2f}")
            print(f"{name}: issue 18's start / this path = {start / min(first, seconds):.2f} (target 3)")
        if path == "prefix bounds" and permutation.prefix_gemm(anchor.device) == "int8" and not uneven:
            stored_rows = [s.bfloat16() for s in sources]  # as `match` solves a bf16 checkpoint's rows
            permutation.int8_gemm_available = lambda: False  # the first pass's GEMM in float32, as before
            try:
                float32 = per_solve_seconds(solve_permutation, sources, anchor, workers)
                stored = per_solve_seconds(solve_permutation, stored_rows, anchor.bfloat16(), workers)
            finally:
                permutation.int8_gemm_available = int8_gemm_available
            int8_stored = per_solve_seconds(solve_permutation, stored_rows, anchor.bfloat16(), workers)
            print(f"| {name}, first pass in float32 | {path} | {float32:.2f} | {float32 / gemm:.2f} |")
            print(f"| {name}, rows in bfloat16 | {path} | {int8_stored:.2f} | {int8_stored / gemm:.2f} |")
            print(f"| {name}, rows in bfloat16, first pass in float32 | {path} | {stored:.2f} | {stored / gemm:.2f} |")
            print(f"{name}: float32 / int8 first pass = {float32 / seconds:.2f} (bf16 rows {stored / int8_stored:.2f})")
        if uneven:  # the certificate without column potentials (v = 0), as before them
            permutation.distance_potentials = lambda src, anchor, norm: torch.zeros_like(norm)
            try:
                plain = per_solve_seconds(solve_permutation, sources, anchor, workers)
            finally:
                permutation.distance_potentials = distance_potentials
            print(f"| {name}, without potentials | as before them | {plain:.2f} | {plain / gemm:.2f} |")
            print(f"{name}: without / with potentials = {plain / seconds:.2f}")
        if path == "bfloat16 filter":
            permutation.fast_bfloat16_gemm = lambda device: False  # solve_permutation looks it up per call
            try:
                seconds = per_solve_seconds(solve_permutation, sources, anchor, workers)
            finally:
                permutation.fast_bfloat16_gemm = fast_bfloat16_gemm
            print(f"| {name} | filter off: float32 GEMM + certificate | {seconds:.2f} | {seconds / gemm:.2f} |")

    if args.peak_rss:
        peak_rss(args.neurons, args.width)


if __name__ == "__main__":
    main()
