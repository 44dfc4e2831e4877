#!/usr/bin/env python
"""Benchmark rotfuse on LLaMA-shaped bf16 checkpoints, against the I/O floor measured in the same run.

    python scripts/bench.py                      # ~150M and ~1B parameters
    python scripts/bench.py --sizes 150m --json  # one size, machine-readable
    python scripts/bench.py --sizes 1b --stages io-floor,match-attn  # some stages only

For each size it generates (deterministically, offline) a pair of related checkpoints -- B is A
plus noise, like two fine-tunes of one base -- sharded the way Hugging Face shards them, then times
in one run, each as its own process so peak RSS is per command:
  io-floor           every tensor of both checkpoints through safetensors' get_tensor, and one
                     of them written with save_file (get_tensor maps lazily: B's bytes are never
                     touched, A's only as they are written -- the floor is torch's import plus
                     writing one checkpoint)
  match-attn         rotfuse match --symmetries rot,scale
  match-all          rotfuse match (FFN permutation too), with per-stage seconds from its report
  match-unrelated    match-all on A and U, a model of its own initialisation (no shared base): the
                     FFN assignment takes the sparse solve (LP-duality certificate) instead of the
                     row-best certificate
  match-close        match-all on A and a close fine-tune of it (A plus 5 % noise, not 50 %): the
                     FFN rows settle on a narrower prefix of the columns
  merge-simple       rotfuse merge --method simple (when the command exists)
  mergekit-linear    mergekit-yaml linear merge of the same pair (when mergekit is installed)
  merge-ties         rotfuse merge --method ties --density 0.2: B and C (a second fine-tune, A plus
                     other noise) with A as their base -- three checkpoints read, one written
  merge-dare-ties    rotfuse merge --method dare-ties --density 0.1, the same three checkpoints
  mergekit-ties      mergekit-yaml ties on them, density 0.2 (when mergekit is installed)
  mergekit-dare-ties mergekit-yaml dare_ties on them, density 0.1 (when mergekit is installed)
  match-2x-deep      match-all on the same model made twice as deep: peak RSS must stay flat
  merge-2x-deep      merge-simple on the twice-as-deep pair: peak RSS must stay flat too
  io-floor-fsync     io-floor, each written file flushed to disk (os.fsync) before the end
  match-attn-fsync   match-attn as rotfuse runs by default: output flushed before it is moved into place
  merge-simple-fsync merge-simple likewise
  merge-simple-ws2   merge-simple as two processes (torchrun, gloo): each merges half the bytes
  stats              rotfuse stats --kind regmean of A on STATS_SAMPLES token sequences (fp32 on the CPU)
  stats-ws2          stats as two processes: each runs half the batches, rank 0 adds the Grams
and `rotfuse --help` / `rotfuse archs` start-up. The floor, mergekit and the plain rotfuse stages
leave writeback to the OS (rotfuse with --no-fsync); the -fsync stages wait for the disk, and
their ratios are to io-floor-fsync. Every other ratio is to io-floor of the same size. Before each
timed run the OS is asked to write back what the previous one left (untimed), so no stage pays for
another's writes.

Wall times on a shared 2-core machine vary by a second between runs, so every stage shorter than
REPEAT_UNDER_S is run `--repeat` times, in rounds that interleave the stages (a slow spell then
slows the floor too), and its fastest run is reported (peak RSS: the largest). Its ratio is the
fastest run over the floor's fastest; the notes add the ratio round by round -- each run over the
floor's run of the same round -- as median and range, which says how typical the fastest pair is.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rotfuse.symmetry.permutation import fast_bfloat16_gemm, prefix_gemm

SIZES = {  # hidden, layers, heads, kv heads, ffn width, vocab
    "150m": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
        vocab_size=32000,
    ),
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=5632,
        vocab_size=32000,
    ),
    "7b": dict(  # LLaMA-7B's layer dimensions; 2 of its 32 layers (2.7 GB a pair), full depth extrapolated
        hidden_size=4096,
        num_hidden_layers=2,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
    ),
    "tiny": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=352,
        vocab_size=1000,
    ),
}
FULL_DEPTH = {"7b": 32}  # sizes benchmarked shallower than the model they stand for
CLOSE_NOISE = 0.05  # match-close: B = A + 5 % noise per weight (cosine 0.999, a typical fine-tune)
SHARD_BYTES = 500 * 1024 * 1024
STAGES = (
    "startup",
    "io-floor",
    "match-attn",
    "match-all",
    "match-unrelated",
    "match-close",
    "merge-simple",
    "mergekit-linear",
    "merge-ties",
    "merge-dare-ties",
    "mergekit-ties",
    "mergekit-dare-ties",
    "match-2x-deep",
    "merge-2x-deep",
    "io-floor-fsync",
    "match-attn-fsync",
    "merge-simple-fsync",
    "match-all-ws2",
    "merge-simple-ws2",
    "stats",
    "stats-ws2",
)
STATS_SAMPLES, STATS_TOKENS = 32, 64  # 4 batches of 8: two per rank at world size 2
TASK_VECTOR_STAGES = {
    "merge-ties": ("ties", "0.2"),
    "merge-dare-ties": ("dare-ties", "0.1"),
    "mergekit-ties": ("ties", "0.2"),
    "mergekit-dare-ties": ("dare_ties", "0.1"),
}
FLUSHED = "-fsync"  # stages that flush their output: measured against io-floor-fsync


@dataclass
class Row:
    size: str
    stage: str
    seconds: float
    peak_rss_mib: float
    ratio_to_floor: float | None = None
    detail: dict = field(default_factory=dict)


def llama_tensors(dims: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, f, v = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    dh = d // dims["num_attention_heads"]
    kv = dims["num_key_value_heads"] * dh
    names = [("model.embed_tokens.weight", (v, d))]
    for i in range(dims["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [
            (p + "input_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (d, d)),
            (p + "self_attn.k_proj.weight", (kv, d)),
            (p + "self_attn.v_proj.weight", (kv, d)),
            (p + "self_attn.o_proj.weight", (d, d)),
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "mlp.gate_proj.weight", (f, d)),
            (p + "mlp.up_proj.weight", (f, d)),
            (p + "mlp.down_proj.weight", (d, f)),
        ]
    return names + [("model.norm.weight", (d,)), ("lm_head.weight", (v, d))]


def generate(folder: Path, dims: dict, base_seed: int, noise_seed: int | None, noise: float = 0.5) -> Path:
    """A LLaMA checkpoint written shard by shard; with noise_seed, base + noise * (noise draw)."""
    from rotfuse.io.writer import CheckpointWriter, ShardPlan

    if (folder / "config.json").exists():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = llama_tensors(dims)
    plans, current, size = [], [], 0
    for name, shape in tensors:
        nbytes = 2 * int(torch.tensor(shape).prod())
        if current and size + nbytes > SHARD_BYTES:
            plans.append(current)
            current, size = [], 0
        current.append((name, "BF16", shape))
        size += nbytes
    plans.append(current)
    names = (
        ["model.safetensors"]
        if len(plans) == 1
        else [f"model-{i + 1:05d}-of-{len(plans):05d}.safetensors" for i in range(len(plans))]
    )
    shard_plans = [ShardPlan(name, plan, {"format": "pt"}) for name, plan in zip(names, plans)]
    writer = CheckpointWriter(tmp, shard_plans)

    def draw(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        if len(shape) == 1:
            return torch.ones(shape)
        return torch.randn(shape, generator=g) * (1.0 / shape[1] ** 0.5)

    for name, shape in tensors:
        value = draw(name, shape, base_seed)
        if noise_seed is not None and len(shape) == 2:
            value += noise * draw(name, shape, noise_seed)
        writer.write(name, value)
    writer.finish()
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        **dims,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    os.rename(tmp, folder)
    return folder


# Peak RSS comes from wait4 on the measured process. On Linux a child's ru_maxrss starts at the
# high-water mark of the process that spawned it (exec keeps the old mm's peak), so spawning straight
# from this script -- torch imported, checkpoints generated -- would give every stage this script's
# peak as a floor and hide what the command itself uses. A tiny interpreter without site packages
# spawns it instead, times it, and hands back seconds and peak RSS on its stderr's last line.
LAUNCHER = r"""
import os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(child.pid, 0)
seconds = time.perf_counter() - start
sys.stderr.write("\n@bench %r %r\n" % (seconds, usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds and peak RSS (MiB) of a command and the children it waited for, measured from a
    launcher that holds almost no memory itself (see LAUNCHER)."""
    process = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], capture_output=True, text=True)
    _, marker, measured = process.stderr.rpartition("\n@bench ")
    if process.returncode != 0 or not marker:
        raise RuntimeError(f"{' '.join(cmd)} failed ({process.returncode}):\n{process.stderr[-3000:]}")
    seconds, max_rss_kib = (float(number) for number in measured.split())
    return seconds, max_rss_kib / 1024, process.stdout


IO_FLOOR = r"""
import os, sys, pathlib
from safetensors import safe_open
from safetensors.torch import save_file
a, b, out = map(pathlib.Path, sys.argv[1:4])
flush = sys.argv[4:] == ["fsync"]
for folder in (b,):
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys(): f.get_tensor(k)
out.mkdir(parents=True, exist_ok=True)
for shard in sorted(a.glob("*.safetensors")):
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(out / shard.name), metadata={"format": "pt"})
    if flush:
        fd = os.open(out / shard.name, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
"""


def warm(*folders: Path) -> None:
    """Read every file once, so the OS page cache holds them as it would after the first stage."""
    for folder in folders:
        for path in sorted(folder.glob("*.safetensors")):
            with open(path, "rb") as handle:
                while handle.read(64 * 1024 * 1024):
                    pass


def rotfuse(*args: str) -> list[str]:
    return [sys.executable, "-m", "rotfuse", *args]


def torchrun(nproc: int, *args: str) -> list[str]:
    """rotfuse launched as `nproc` processes on this machine (gloo), as on a cluster node."""
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(port),
        "-m",
        "rotfuse",
        *args,
    ]


def has_command(name: str) -> bool:
    return subprocess.run(rotfuse(name, "--help"), capture_output=True).returncode == 0


REPEAT_UNDER_S = 20.0  # longer stages vary little relative to their length: one run


@dataclass
class Stage:
    name: str
    cmd: list[str]
    detail_from_json: bool = False
    seconds: float = float("inf")
    rss: float = 0.0
    out: str = ""
    times: list[float] = field(default_factory=list)  # every run's seconds, round by round


def timed_rounds(stages: list[Stage], repeat: int, output: Path) -> None:
    """Run every stage once, then again in rounds while rounds are left, skipping stages whose first
    run took REPEAT_UNDER_S or more; keep each stage's fastest run (and largest peak RSS). Rounds
    interleave the stages, so a slow spell of this shared machine slows the floor as much as what
    is measured against it instead of one stage's repeats. Each run writes into an absent `output`."""
    for round_number in range(max(1, repeat)):
        for stage in stages:
            if round_number and stage.seconds >= REPEAT_UNDER_S:
                continue
            shutil.rmtree(output, ignore_errors=True)
            os.sync()  # untimed: what earlier runs left to write back is not this run's cost
            seconds, rss, out = run(stage.cmd)
            if seconds < stage.seconds:
                stage.seconds, stage.out = seconds, out
            stage.rss = max(stage.rss, rss)
            stage.times.append(seconds)
            line = f"  {stage.name:<18} run {len(stage.times)}: {seconds:8.2f} s  {rss:8.1f} MiB"
            print(line, file=sys.stderr, flush=True)
    shutil.rmtree(output, ignore_errors=True)


def bench_size(size: str, root: Path, keep: bool, repeat: int, stages: frozenset[str] = frozenset(STAGES)) -> list[Row]:
    dims = SIZES[size]
    a = generate(root / f"{size}-a", dims, base_seed=0, noise_seed=None)
    b = generate(root / f"{size}-b", dims, base_seed=0, noise_seed=1)
    work = root / f"{size}-out"
    planned: list[Stage] = []

    def stage(name: str, cmd: list[str], detail_from_json: bool = False) -> None:
        if name in stages:
            planned.append(Stage(name, cmd, detail_from_json))

    no_fsync = ("--no-fsync",)  # as the floor and mergekit: writeback left to the OS
    stage("io-floor", [sys.executable, "-c", IO_FLOOR, str(a), str(b), str(work)])
    stage("io-floor-fsync", [sys.executable, "-c", IO_FLOOR, str(a), str(b), str(work), "fsync"])
    attn = ("match", str(a), str(b), "-o", str(work), "--symmetries", "rot,scale", "--json", "-q", "--device", "cpu")
    stage("match-attn", rotfuse(*attn, *no_fsync), detail_from_json=True)
    stage("match-attn-fsync", rotfuse(*attn), detail_from_json=True)
    stage(
        "match-all",
        rotfuse("match", str(a), str(b), "-o", str(work), "--json", "-q", "--device", "cpu", *no_fsync),
        detail_from_json=True,
    )
    if "match-close" in stages:
        close = generate(root / f"{size}-close", dims, base_seed=0, noise_seed=1, noise=CLOSE_NOISE)
        stage(
            "match-close",
            rotfuse("match", str(a), str(close), "-o", str(work), "--json", "-q", "--device", "cpu", *no_fsync),
            detail_from_json=True,
        )
    if "match-unrelated" in stages:
        unrelated = generate(root / f"{size}-u", dims, base_seed=1, noise_seed=None)
        stage(
            "match-unrelated",
            rotfuse("match", str(a), str(unrelated), "-o", str(work), "--json", "-q", "--device", "cpu", *no_fsync),
            detail_from_json=True,
        )
    # world size 2 against world size 1 (match-all, the same run): speed-up, and the largest peak RSS
    # of one process (the launcher's wait4 gives the biggest of the tree, the torchrun agent included)
    stage(
        "match-all-ws2",
        torchrun(2, "match", str(a), str(b), "-o", str(work), "--json", "-q", "--device", "cpu", *no_fsync),
        detail_from_json=True,
    )
    if stages & {"merge-simple", "merge-simple-fsync", "merge-2x-deep", "merge-simple-ws2"} and has_command("merge"):
        simple = ("merge", "--method", "simple", str(a), str(b), "-o", str(work), "-q")
        stage("merge-simple", rotfuse(*simple, *no_fsync))
        stage("merge-simple-fsync", rotfuse(*simple))
        stage("merge-simple-ws2", torchrun(2, *simple, *no_fsync))  # against merge-simple, the same run
    if stages & {"stats", "stats-ws2"} and has_command("stats"):
        from safetensors.torch import save_file

        data = root / f"{size}-stats-data.safetensors"
        shape = (STATS_SAMPLES, STATS_TOKENS)
        ids = torch.randint(3, dims["vocab_size"], shape, generator=torch.Generator().manual_seed(0))
        save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, str(data))
        regmean = ("stats", str(a), "--data", str(data), "--kind", "regmean", "-o", str(work), "-q", "--device", "cpu")
        stage("stats", rotfuse(*regmean))
        stage("stats-ws2", torchrun(2, *regmean))  # against stats, the same run
    mergekit = shutil.which("mergekit-yaml") or os.environ.get("MERGEKIT_YAML")
    if mergekit and "mergekit-linear" in stages:
        config = root / f"{size}-mergekit.yaml"
        config.write_text(
            "merge_method: linear\ndtype: bfloat16\nmodels:\n"
            f"  - model: {a}\n    parameters: {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n"
        )
        stage("mergekit-linear", [mergekit, str(config), str(work), "--lazy-unpickle", "--out-shard-size", "500M"])
    folders = [a, b] + [
        root / f"{size}-{tag}"
        for stage_name, tag in (("match-unrelated", "u"), ("match-close", "close"))
        if stage_name in stages
    ]
    if stages & set(TASK_VECTOR_STAGES):  # A as the base of B and of C, a second fine-tune of it
        c = generate(root / f"{size}-c", dims, base_seed=0, noise_seed=2)
        folders.append(c)
        for name in ("merge-ties", "merge-dare-ties"):
            method, density = TASK_VECTOR_STAGES[name]
            if has_command("merge"):
                stage(
                    name,
                    rotfuse(
                        "merge",
                        "--method",
                        method,
                        str(b),
                        str(c),
                        "--base",
                        str(a),
                        "--density",
                        density,
                        "-o",
                        str(work),
                        "-q",
                        *no_fsync,
                    ),
                )
        for name in ("mergekit-ties", "mergekit-dare-ties"):
            method, density = TASK_VECTOR_STAGES[name]
            if mergekit and name in stages:
                config = root / f"{size}-{name}.yaml"
                config.write_text(
                    f"merge_method: {method}\nbase_model: {a}\ndtype: bfloat16\nmodels:\n"
                    + "".join(f"  - model: {m}\n    parameters: {{weight: 1.0, density: {density}}}\n" for m in (b, c))
                )
                stage(name, [mergekit, str(config), str(work), "--lazy-unpickle", "--out-shard-size", "500M"])
    if stages & {"match-2x-deep", "merge-2x-deep"}:
        deep_dims = {**dims, "num_hidden_layers": 2 * dims["num_hidden_layers"]}
        deep_a = generate(root / f"{size}-deep-a", deep_dims, base_seed=0, noise_seed=None)
        deep_b = generate(root / f"{size}-deep-b", deep_dims, base_seed=0, noise_seed=1)
        folders += [deep_a, deep_b]
        stage(
            "match-2x-deep",
            rotfuse("match", str(deep_a), str(deep_b), "-o", str(work), "--json", "-q", "--device", "cpu", *no_fsync),
            detail_from_json=True,
        )
        if has_command("merge"):
            stage(
                "merge-2x-deep",
                rotfuse("merge", "--method", "simple", str(deep_a), str(deep_b), "-o", str(work), "-q", *no_fsync),
            )
    warm(*folders)  # every stage, the floor included, reads from a warm page cache: comparable ratios
    timed_rounds(planned, repeat, work)
    if not keep:
        for folder in folders[2:]:
            shutil.rmtree(folder, ignore_errors=True)

    rows = []
    for done in planned:
        detail = {}
        if done.detail_from_json and done.out.strip():
            report = json.loads(done.out)
            detail = {"timings": report.get("timings"), "distance_reduction": report["totals"]["matched"]["reduction"]}
        rows.append(Row(size, done.name, round(done.seconds, 2), round(done.rss, 1), detail=detail))
    for row in rows:  # against world size 1 of the same command (match-all, merge-simple, stats), same run
        single = next((r for r in rows if r.stage == row.stage.removesuffix("-ws2")), None)
        if row.stage.endswith("-ws2") and single is not None:
            row.detail["speedup_vs_ws1"] = round(single.seconds / row.seconds, 2)
            row.detail["rss_vs_ws1"] = round(row.peak_rss_mib / single.peak_rss_mib, 2)
    if size in FULL_DEPTH:  # proportional to depth: embeddings and head counted per layer too (an upper bound)
        for row in rows:
            row.detail["per_layer_s"] = round(row.seconds / dims["num_hidden_layers"], 2)
            row.detail["full_depth_s"] = round(row.seconds * FULL_DEPTH[size] / dims["num_hidden_layers"], 1)
    floors = {kind: next((r for r in rows if r.stage == "io-floor" + kind), None) for kind in ("", FLUSHED)}
    times = {done.name: done.times for done in planned}
    for row in rows:
        floor = floors[FLUSHED if row.stage.endswith(FLUSHED) else ""]
        if floor is not None:
            row.ratio_to_floor = round(row.seconds / floor.seconds, 2)
            by_round = round_ratios(times[row.stage], times[floor.stage])
            if by_round is not None and row is not floor:
                row.detail["x_floor_by_round"] = by_round
    return rows


def round_ratios(stage: list[float], floor: list[float]) -> dict | None:
    """Each round's run over the floor's run in the same round -- median, lowest, highest -- where
    both ran every round (two or more): how far the fastest runs' ratio is from a typical round's
    on a machine whose speed drifts between runs."""
    if len(stage) < 2 or len(stage) != len(floor):
        return None
    ratios = [s / f for s, f in zip(stage, floor, strict=True)]
    return {
        "median": round(statistics.median(ratios), 2),
        "low": round(min(ratios), 2),
        "high": round(max(ratios), 2),
        "rounds": len(ratios),
    }


def console_script() -> list[str]:
    """The `rotfuse` console script of this interpreter's environment (found whether or not it is
    activated), else the one on PATH, else `python -m rotfuse`."""
    beside = Path(sys.executable).with_name("rotfuse")
    found = str(beside) if beside.is_file() else shutil.which("rotfuse")
    return [found] if found else rotfuse()


def startup_rows() -> list[Row]:
    rows = []
    for name, args in (("startup --help", ["--help"]), ("startup archs", ["archs"])):
        best = min(run([*console_script(), *args])[0] for _ in range(5))
        rows.append(Row("-", name, round(best, 3), 0.0))
    return rows


def markdown(rows: list[Row]) -> str:
    lines = [
        "| size | stage | seconds | x I/O floor (-fsync: x io-floor-fsync) | peak RSS (MiB) | notes |",
        "|---|---|---:|---:|---:|---|",
    ]
    by_size = {r.size: {x.stage: x for x in rows if x.size == r.size} for r in rows}
    for r in rows:
        note = ""
        if r.detail.get("timings"):
            t = r.detail["timings"]
            note = "stages (s, summed over threads): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items() if k != "total")
        shallow = {"match-2x-deep": "match-all", "merge-2x-deep": "merge-simple"}.get(r.stage)
        if shallow in by_size[r.size]:
            sep = "; " if note else ""
            note += (
                f"{sep}RSS vs {shallow}: {r.peak_rss_mib / by_size[r.size][shallow].peak_rss_mib:.2f}x "
                "(twice the floor's bytes)"
            )
        if "full_depth_s" in r.detail:
            note += (
                f"{'; ' if note else ''}{r.detail['per_layer_s']:.2f} s per layer, "
                f"{r.detail['full_depth_s']:.0f} s at {FULL_DEPTH[r.size]} layers (extrapolated)"
            )
        if "speedup_vs_ws1" in r.detail:
            note += (
                f"{'; ' if note else ''}world size 2 vs {r.stage.removesuffix('-ws2')} (world size 1): "
                f"speed {r.detail['speedup_vs_ws1']:.2f}x, "
                f"peak RSS of one rank {r.detail['rss_vs_ws1']:.2f}x"
            )
        if "x_floor_by_round" in r.detail:
            spread = r.detail["x_floor_by_round"]
            note += (
                f"{'; ' if note else ''}x floor round by round: median {spread['median']:.2f} "
                f"({spread['low']:.2f}-{spread['high']:.2f}, {spread['rounds']} rounds)"
            )
        ratio = "" if r.ratio_to_floor is None else f"{r.ratio_to_floor:.2f}"
        rss = "" if not r.peak_rss_mib else f"{r.peak_rss_mib:.0f}"
        lines.append(f"| {r.size} | {r.stage} | {r.seconds:.2f} | {ratio} | {rss} | {note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="150m,1b", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints go (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep generated checkpoints for the next run")
    parser.add_argument("--json", action="store_true", help="print rows as JSON instead of Markdown")
    parser.add_argument(
        "--repeat", type=int, default=3, help=f"runs of each stage under {REPEAT_UNDER_S:.0f} s; the fastest counts"
    )
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    args = parser.parse_args()
    stages = frozenset(name.strip() for name in args.stages.split(",") if name.strip())
    if stages - set(STAGES):
        parser.error(f"unknown stage(s) {', '.join(sorted(stages - set(STAGES)))} (use {', '.join(STAGES)})")
    root = args.workdir or Path(tempfile.mkdtemp(prefix="rotfuse-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpus": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # e.g. AVX2, AVX512
        "bfloat16_gemm": fast_bfloat16_gemm(torch.device("cpu")),  # which FFN and head-score paths run
        "prefix_gemm": prefix_gemm(torch.device("cpu")),  # the FFN prefix passes' first GEMM
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
    }
    print(f"benchmark in {root} on {machine}", file=sys.stderr)
    rows = startup_rows() if "startup" in stages else []
    for size in args.sizes.split(","):
        rows += bench_size(size.strip(), root, args.keep, max(1, args.repeat), stages)
    if not args.keep and args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps({"machine": machine, "rows": [asdict(r) for r in rows]}, indent=2))
    else:
        print(markdown(rows))


if __name__ == "__main__":
    main()
