"""The residual stream: how it is seen, scored and searched for the one map that moves every layer."""
