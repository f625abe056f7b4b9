"""Kiln's node engine: schemas, validation, executor, nodes, models, sampling. Never imports
fastapi, celery, redis or boto3."""
