"""Applications built on the public `zmqmesh` API only: the command line, the HTTP
gateway and dashboard, the launcher and the demo."""
