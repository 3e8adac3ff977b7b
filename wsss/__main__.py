"""``python -m wsss`` and ``torchrun -m wsss train ...`` (every rank), as before the command
moved to cli/: an entry point, run and never imported, so the one line from the ground floor
to the top floor (tests/cli/test_layering.py allows it and only it)."""

from cli.main import main

main()
