"""``python -m wsss``, which is what ``torchrun -m wsss train ...`` runs on every rank."""

from wsss.cli import main

main()
