"""``python -m fleet`` is the ``fleet`` command (the supervisor starts its children this way)."""

from fleet.cli import main

main()
