"""Merging: the streaming engine, the method registry (methods/), and the statistics some methods need (stats/)."""
