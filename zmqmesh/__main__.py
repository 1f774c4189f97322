"""``python -m zmqmesh`` is the ``zmqmesh`` command."""

from .tools.cli import main

main()
