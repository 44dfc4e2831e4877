"""rotfuse: align and merge transformer checkpoints using their exact parameter symmetries."""

__version__ = "0.1.0"
