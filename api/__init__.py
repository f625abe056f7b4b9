"""The FastAPI gateway. Never imports torch."""
