"""``python -m zmqmesh`` is the ``zmqmesh`` command."""

from .tools.console import main

main()
