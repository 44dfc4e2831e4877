"""Matching: align a model to an anchor through its exact symmetries (`rotfuse match`, `rotfuse scramble`)."""
