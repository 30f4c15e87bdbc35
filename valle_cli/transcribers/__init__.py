"""Built-in transcriber plugins (registered in pyproject.toml under valle.transcribers)."""
