"""Architecture specs (archs/*.yaml) and example batch configs, shipped as package data `rotfuse.configs`."""
