"""The continuous-batching engine. Never imports Typer, Rich or prompt-toolkit."""
