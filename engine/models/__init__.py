"""Model architectures (one per file), checkpoint loading and configuration inference."""
