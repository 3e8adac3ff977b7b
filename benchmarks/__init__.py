"""Benchmarks that compare the project's parts side by side in one run (they may import
training, export and serving alike; nothing imports them)."""
