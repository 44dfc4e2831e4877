"""Learned matching (issue 16; docs/design/learned-matching.md): optimise the parameters of the exact
symmetries applied to MODEL for the loss of its average with ANCHOR, starting from the matched copy.

maps.py parameterises the maps (orthogonal through exp of a skew matrix, RoPE pairs as angles,
scales through their log, permutations through the straight-through estimator); build.py turns
them into g(MODEL)'s tensors, under the checkpoint's names; names.py finds those names in the live
transformers model; objective.py is `interpolate`'s loss made differentiable; loop.py runs it."""
