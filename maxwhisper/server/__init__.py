"""`maxwhisper serve`: OpenAI's audio transcription API over HTTP, every request's
windows decoded in one shared batch. Needs the `server` extra (FastAPI, uvicorn)."""

from .app import ServerSettings, create_app, serve

__all__ = ["ServerSettings", "create_app", "serve"]
