"""Front-ends: run (files + stdin), chat (REPL), progress view. All share Driver."""
