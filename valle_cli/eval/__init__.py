"""`valle eval`: how good a model is, measured the way VALL-E papers report it.

judges.py (the ASR transcriber and the speaker verifier, with offline fallbacks), items.py (what to
synthesize: held-out sentences in reference voices, from a text file + voice folders or from a prepared
dataset), run.py (synthesize, measure, aggregate), report.py (JSON and markdown).
"""
