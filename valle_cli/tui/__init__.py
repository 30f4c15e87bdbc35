"""`valle tui`: a Textual control room for a training run.

app.py (the App: target, child process), screens/ (the dashboard and its dialogs, each with its .tcss beside
it), widgets/ (curves, stats, checkpoints; CSS in their DEFAULT_CSS), messages.py (what the background workers
post to the UI), source.py (reading the run folder, the history, starting training: no Textual).
"""
