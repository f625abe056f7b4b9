"""Celery workers, the engine host subprocess, routing, job store and storage."""
