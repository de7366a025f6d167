"""The pure core: bytes and snapshots in, frozen dataclasses out. No I/O here, no
imports from `ctfix.platform`; everything is testable without root or sockets."""
