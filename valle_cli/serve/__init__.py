"""`valle serve`: one server with an OpenAI-compatible HTTP API and a web UI, safe by default.

settings.py (limits and where the server keeps its files), models.py (the models it may serve, by name),
voices.py (reference voices, by name), formats.py (audio encoders), jobs.py (the bounded generation queue),
api.py (the FastAPI app: routes, auth, errors, body limits), server.py (uvicorn).
"""
