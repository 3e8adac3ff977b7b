"""Benchmarks that compare the project's parts side by side in one run (they may import
training, export and serving alike; nothing imports them)."""

from pathlib import Path

# The real photos a benchmark sends by default: the shared Oxford-IIIT Pet subset beside the
# project, relative to the repository root the benchmarks run from (make bench, make soak).
SHARED_PETS = Path("../shared/data/oxford-pet-subset")
