"""Layer 1, wire: what goes over the sockets, as pure functions and values (no sockets).

`frames` (every frame layout, reserved name and routing-id layout), `zre` (the ZRE codec
of RFC 36), `codec` (msgpack with size limits).
"""
