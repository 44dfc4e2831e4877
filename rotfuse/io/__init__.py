"""Checkpoint folders: lazy reading, streaming writing, atomic output."""
