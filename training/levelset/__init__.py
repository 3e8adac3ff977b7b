"""The CAM-guided level-set refiner (paper 003): spectral layers first."""
