"""Statistics for Fisher and RegMean merging: collected with transformers, stored as a statistics folder."""
