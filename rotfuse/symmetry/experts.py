"""Mixture-of-experts symmetries (docs/design/symmetries.md section 9): the routed experts of a
layer can swap places together with the router's rows, and each expert's FFN neurons permute on
their own index.

A MoE layer computes sum over the chosen e of p_e(x) FFN_e(x), where p = softmax(router(x)) and
the top-k choice is over the same scores: permuting the experts and the router's output rows
(and bias) by one permutation only relabels e. Each FFN_e is an FFN of its own, so its neurons
permute independently of the other experts' (section 1).

Pairing source expert i with anchor expert j is worth <router_i, router_j> plus the best the
neuron permutation can do for that pair, max over P of <P rows_i, rows_j> (a linear assignment on
the pair's neuron rows, `ffn_rows`). The neuron permutations of different pairs are independent,
so one assignment on the E x E scores finds the joint optimum of both -- as heads.py does for
whole heads and their rotations -- and the per-expert permutations are the ones found while
scoring the chosen pairs.
"""

from __future__ import annotations

import torch

from rotfuse.symmetry.permutation import neuron_rows, permute_ffn, random_permutation, solve_permutation
from rotfuse.symmetry.weights import Experts, Ffn, Linear, ffn_rows


def _router_rows(router: Linear) -> torch.Tensor:
    """`[E, n]` float64: every router parameter indexed by expert, one row per expert."""
    parts = [router.weight.double()] + ([router.bias.double()[:, None]] if router.bias is not None else [])
    return torch.cat(parts, dim=1)


def neuron_permutation(src: Ffn, anchor: Ffn) -> tuple[torch.Tensor, float]:
    """The best neuron permutation of one source expert onto one anchor expert, and its score
    <P rows_src, rows_anchor> (float64)."""
    src_rows, anchor_rows = neuron_rows(src, anchor)
    perm = solve_permutation(src_rows, anchor_rows)
    score = (src_rows.index_select(0, perm.to(src_rows.device)).double() * anchor_rows.double()).sum()
    return perm, float(score)


def expert_pair_scores(
    src: Experts, anchor: Experts, permute_neurons: bool
) -> tuple[torch.Tensor, list[list[torch.Tensor | None]]]:
    """`[E, E]` float64 scores of source expert i at anchor slot j, and the neuron permutation each
    pair would use (None without `permute_neurons`: the identity)."""
    count = len(src.ffns)
    scores = _router_rows(src.router) @ _router_rows(anchor.router).T
    perms: list[list[torch.Tensor | None]] = [[None] * count for _ in range(count)]
    for i, s in enumerate(src.ffns):
        for j, a in enumerate(anchor.ffns):
            if permute_neurons:
                perms[i][j], score = neuron_permutation(s, a)
            else:
                score = float((ffn_rows(s, torch.float64) * ffn_rows(a, torch.float64)).sum())
            scores[i, j] += score
    return scores, perms


def permute_experts(experts: Experts, perm: torch.Tensor) -> Experts:
    """Expert `perm[j]` of `experts` moved to slot j, the router's rows with it."""
    index = perm.to(experts.router.weight.device)
    router = experts.router.map(lambda t: t.index_select(0, index))
    return Experts(router, [experts.ffns[int(i)] for i in perm])


def permute_expert_neurons(experts: Experts, perms: list[torch.Tensor | None]) -> Experts:
    """Each expert's neurons permuted by its own permutation (None: left as it is)."""
    return Experts(
        experts.router, [ffn if p is None else permute_ffn(ffn, p) for ffn, p in zip(experts.ffns, perms, strict=True)]
    )


def random_experts(experts: Experts, generator: torch.Generator, whole: bool, neurons: bool) -> Experts:
    """A random member of the enabled MoE symmetries: whole experts, and each one's neurons."""
    if whole:
        experts = permute_experts(experts, random_permutation(len(experts.ffns), generator))
    if neurons:
        experts = permute_expert_neurons(experts, [random_permutation(f.width, generator) for f in experts.ffns])
    return experts
