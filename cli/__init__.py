"""The ``wsss`` command: the top floor. It reads a config and calls training/, export/,
serving/ and benchmarks/; nothing in them imports it. ``cli.main.COMMANDS`` is the table."""
