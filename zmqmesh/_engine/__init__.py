"""Layer 7, engine: composes the layers below on one event loop (`Engine`), the send-side
scheduling (`Outbound`), the one stop plan, and `NodeBase`: the logic of every call as a
plan of steps that the drivers carry out."""
