"""The ``kiln`` command: one entry point over the engine's, the gateway's and the worker's commands."""
