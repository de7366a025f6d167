"""The OS edge: the only code that opens netlink sockets, enters namespaces, reads
/proc and talks to libnftables or libiptc. `ctfix.core` never imports from here."""
