"""``python -m zmqmesh`` is the ``zmqmesh`` command."""

try:
    from .tools.cli import main
except KeyboardInterrupt:  # (Ctrl-C while the command loads: nothing was started, 130 as for every command)
    raise SystemExit(130) from None

main()
