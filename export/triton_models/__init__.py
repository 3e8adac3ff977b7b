"""Triton python-backend models, copied into the repository as ``<model>/<version>/model.py``."""
