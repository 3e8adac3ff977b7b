"""The experiments that read the stages: the papers' tables (``reproduce``), the studies
(``studies``: CAM methods x refiners, real photos, the profile's evaluation) and paper 003's
level-set study with its cross-validation (``levelset_study``, ``levelset_tuning``).

A floor of its own, above training and export and below benchmarks and the CLI, which may
import it; no stage imports it (tests/cli/test_layering.py).
"""
