"""``python -m zmqmesh`` is the ``zmqmesh`` command."""

from .cli import main

main()
