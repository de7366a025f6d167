"""Classic BPF socket filters: attach a program to a socket.

Know before changing: the kernel copies the program at SO_ATTACH_FILTER, so the
buffer only has to live through the call; a program is a sequence of
`struct sock_filter` (u16 code, u8 jt, u8 jf, u32 k) in host order.
"""

from __future__ import annotations

import ctypes
import socket
import struct

SO_ATTACH_FILTER = 26


def attach(sock: socket.socket, program: bytes) -> None:
    """Attach a classic BPF program to `sock` (raises OSError when the kernel refuses)."""
    holder = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("@HP", len(program) // 8, ctypes.addressof(holder))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
