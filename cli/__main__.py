"""``python -m cli``: the ``wsss`` command."""

from cli.main import main

main()
