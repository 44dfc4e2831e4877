"""Running checkpoints with transformers: data, scores, `verify`, `interpolate`, plots."""
