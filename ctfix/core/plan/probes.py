"""Which address a plan's after-apply check asks the route lookup about. Pure.

Know before changing: asking about a local address answers `local`, never the
route a reply takes; so a probe is a client actually seen, else an address in the
network that is not one of the host's.
"""

from __future__ import annotations

import ipaddress

from ctfix.core.addr import unmap
from ctfix.core.diagnosis.requests import probe_in
from ctfix.core.model import ClientNetwork, Diagnosis


def probe_address(cn: ClientNetwork, diagnosis: Diagnosis) -> str:
    """An address in the client network to ask the route lookup about.

    A client actually seen is best; then the address explain asked about; otherwise
    the network's last host address, which is rarely a local one (asking about a
    local address would answer `local`).
    """
    net = ipaddress.ip_network(cn.network, strict=False)
    for reply in diagnosis.evidence.wrong_source:
        client = unmap(reply.client.rsplit(":", 1)[0].strip("[]"))
        try:
            if ipaddress.ip_address(client) in net:
                return client
        except ValueError:
            continue
    if cn.probe is not None:
        return cn.probe
    return probe_in(str(net), {unmap(a) for a in diagnosis.local_addresses})
