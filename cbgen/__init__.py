"""cbgen: batch and interactive LLM generation on a continuous-batching engine."""

__version__ = "0.1.0"
