"""Snapshot (+ knowledge base) -> Diagnosis: verdict, reasons, evidence, fixes. Pure.

Definitions (the contract of `ctfix explain`; keep this docstring in step with them):

* A *serving* socket is an unconnected UDP socket on the port. It serves IPv4 if it
  is AF_INET, or AF_INET6 without v6only and bound to `::`; IPv6 if AF_INET6.
  A *connected* socket on the port (netcat connect()s to its first client) serves
  only its peer; it is listed, and named in the reasons, but serves no network.
* A wildcard socket is *exposed* unless the knowledge base says its program answers
  from the request's destination (`affected` is False, matched by process name or
  command line, not by port alone) or it is ctfix's own `ctfix serve`; evidence
  beats that claim: when conntrack shows wrong-source replies for a family it
  serves, it is exposed (it may not be the real program, or its config differs).
* *Requests*: remote clients' entries whose original destination port is the port,
  or whose reply tuple's source port is (a local DNAT forwarded them here). Their
  *addressed* address is the reply tuple's source: what the server must answer from.
* *Client networks*, per family served: the networks of the clients seen in the
  conntrack table for the port (ctfix.core.clientnet, the one definition watch uses
  too: the connected network that contains the client, else the /24 or /64 around
  it that overlaps no connected network); when none is seen for a family, each
  connected client network of that family (loopback, link-local and host prefixes
  such as a /32 on lo left out).
* *Addressed*: for a seen network, the local addresses its clients sent to. For an
  assumed network: every global local address of the family when an exposed
  wildcard socket serves it (a client on a connected network can reach any local
  address: the host routes between its own addresses), else the specifically bound
  addresses.
* *On-link*: the host's own global addresses on the interface a network is reached
  by (its clients' gateway). Its clients may address them at any time: conntrack
  forgets a flow after 30 s, so not seeing such a client is no evidence there is
  none. They count like addressed ones for *ok* (and for the policy-route advice).
* *Predicted source*: the kernel's answer to `ip route get CLIENT ipproto udp sport
  PORT` for a client in the network (a seen client, else a probe address in it).
* *Evidence beats prediction*: a request conntrack shows answered from the right
  source (by the server: a reply the snat-zone fix rewrote in one of ctfix's zones,
  ctfix.core.zones, is the fix's, also after a revert) makes its address fine for its
  network; one answered from an address that
  routing would not pick (and no rewrite or specific bind explains) proves that the
  program chooses its source: its family is not exposed (`observed-right-source`).
* A network is *ok* when each address it addresses or has on-link would be answered
  from that address: it is the predicted source, or a socket is bound to it
  specifically, or no serving socket of the family is exposed, or a working
  snat-zone rewrites to it, or conntrack shows it answered.
* *Blind*: a family that conntrack does not track here (`tracking`), or a table that
  cannot be read: no evidence can exist, and a clean table proves nothing.
* *Uplinks* (remote clients only, beyond a router): an address the clients sent to
  that lives on another interface than the one their replies leave by (the same
  lookup's interface, the *egress*), where that interface leads to a router (a route
  via it, any table, covers the clients or has a gateway). Its replies leave by
  another uplink than their requests came in by, unless a mark rerouted them there
  (or, for replies that already leave from the address, a source rule does); then
  the network is not *ok* either (`reply-leaves-other-uplink`).
* *Forwarded services*: what clients send to before a DNAT that forwards it to the
  port on a local address (from the DNAT rules with the chains that jump to them,
  and from conntrack); their clients are answered right only from the DNAT's target,
  or by a rewrite to the service itself (address and port).
* Verdict: `broken` when the conntrack table (or `--listen`) shows a wrong-source
  reply, unless a remedy now in place covers it: a working snat-zone SNAT to the
  address the server had to answer from (for clients of a forwarded service: to the
  service), or a policy rule on the port through which the route lookup for the
  client's network now gives that address. Such a recorded reply predates the change
  and is reported as such, unless conntrack dates it after the fix ctfix recorded
  (then the fix is *ineffective* for it); one seen live (`--listen`) is never
  discounted. The one wrong-source reply per family of a program whose knowledge-base
  entry documents it (`wrong_first_reply`: the first request after it starts) does
  not make it `broken` either. Else `at-risk` when some client network is not ok, or
  the recorded fix misses a forwarded service; else `unknown` when a blind family is served by a
  wildcard socket (only a specific bind is right without evidence; a knowledge-base
  claim or a routing prediction could be contradicted by evidence that cannot
  exist); else `ok`.
  Also `broken` when conntrack holds stale NAT entries of the port (clients still sent
  to a target the DNAT rules no longer name; `stale`), whatever the rest says.
* *Service down*: nothing bound, no DNAT forwarding the port elsewhere (on the host,
  or to the backends the NAT rules name for its clients), and requests without a
  usable reply. The verdict (about wrong sources) is what it is (`ok`, or `broken` for
  a server gone after wrong-source replies); the headline, the reasons and the exit
  status (1) say it.
* *Unanswered*: the port's requests that got no reply, per service and reason
  (no-socket, no-reply, wrong-source, stale-nat; one-way services apart), as watch
  classifies them (`unanswered`); `evidence.unanswered` is their count (one-way apart),
  the one count of requests without a usable reply. Reasons only: neither the verdict
  nor the exit status changes for them.

The parts, each one idea: `requests` (which requests and addresses exist),
`listeners` (who listens; knowledge-base recognition), `evidence` (what conntrack
shows; what is history), `blindness` (where conntrack cannot show anything),
`exposure` (per client network), `uplinks` (which uplink a reply to remote clients
leaves by), `forwarding` (services a DNAT forwards here), `netfilter` (rules that
cannot help), `effect` (does the recorded fix work), `advice` (the fixes),
`unanswered` (requests without a reply, by why); `codes` lists every reason code.
`diagnose()`
composes them and decides the verdict.

Know before changing: this package only reads the Snapshot; anything it needs from
the system must be collected by ctfix.platform.snapshot first (which asks
`probe_destinations` and `uplink_lookups` what to look up), so the analysis stays
testable by hand.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from ctfix.core.addr import endpoint, family_name, parse_endpoint, unmap
from ctfix.core.diagnosis import (
    advice,
    blindness,
    effect,
    evidence,
    exposure,
    forwarding,
    listeners,
    netfilter,
    requests,
    stale,
    unanswered,
)
from ctfix.core.diagnosis.advice import recommended_first
from ctfix.core.diagnosis.codes import ReasonCode, reason
from ctfix.core.diagnosis.evidence import wrong_source_reply
from ctfix.core.diagnosis.netfilter import (
    PROBLEM_DNAT_REPLY,
    PROBLEM_DROP_REPLY,
    PROBLEM_NOTRACK,
    PROBLEM_SNAT_REPLY,
    PROBLEM_SNAT_REQUEST,
    PROBLEM_ZONE_ALONE,
    rule_problem,
)
from ctfix.core.diagnosis.requests import (
    connected_networks,
    forwarded_to,
    newest_last,
    probe_destinations,
    requests_to,
    usable_addresses,
    waiting_clients,
)
from ctfix.core.diagnosis.uplinks import reply_marks, uplink_lookups
from ctfix.core.model import Diagnosis, Family, Reason, Verdict
from ctfix.core.nat.paths import dnat_paths
from ctfix.core.snapshot import Snapshot

if TYPE_CHECKING:
    from ctfix.core.rules import KnowledgeBase


def diagnose(snapshot: Snapshot, kb: KnowledgeBase | None = None) -> Diagnosis:
    """Judge the snapshot: see the module docstring for every definition used."""
    port = snapshot.port
    local = {a.address for a in snapshot.addresses}
    asked = requests.requests_to(snapshot.flows, port, local)
    on_port = [lst for lst in snapshot.listeners if lst.port == port]

    def other_port(server_port: int) -> bool:
        return listeners.replies_from_other_port(
            on_port if server_port == port else (), kb, server_port
        )

    shown = evidence.gather(snapshot, asked, local, other_port)
    replies: dict[Family, int] = {}
    for w in shown.wrong_source:
        family = family_name(unmap(parse_endpoint(w.client)[0]))
        replies[family] = replies.get(family, 0) + w.count
    caught = set(replies)
    rewritten = netfilter.rewrites(port, snapshot.netfilter)
    chosen = {
        f: text
        for f, text in exposure.observed_choice(snapshot, shown, rewritten).items()
        if f not in caught
    }
    configs: dict[int, dict[str, str]] = {}
    for config in snapshot.config_files:
        configs.setdefault(config.pid, {})[config.path] = config.text
    listening = listeners.judge(snapshot.listeners, kb, port, caught, chosen, configs, replies)
    clients = exposure.client_networks(snapshot, asked, listening, rewritten, shown)
    blind = blindness.blind_families(snapshot, listening)
    forwards = forwarded_to(port, snapshot.netfilter, snapshot.flows, local)
    paths = dnat_paths(snapshot.nat_rules, port) if snapshot.nat_rules is not None else ()
    behind = forwarding.forwarded_services(port, paths, snapshot.flows, local)
    rules = netfilter.rule_hits(snapshot.netfilter)
    present = evidence.split_history(shown, snapshot, rewritten, listening.caveat)
    fixed = effect.fix_effect(snapshot, shown, behind, listening.exposed)

    # Who is on the port, what reaches it, what conntrack shows, who is exposed, what
    # the rules do: in the order an expert would say it.
    reasons: list[Reason] = []
    pinned = stale.stale_nat(snapshot)
    silent = unanswered.findings(snapshot, kb, local, stale=pinned.findings, other_port=other_port)
    # One count of requests without a usable reply: the unanswered records' (not one-way).
    shown = replace(shown, unanswered=sum(f.flows for f in silent if not f.one_way))
    away = pinned.backends and not forwards  # DNAT'd to backends elsewhere
    if not snapshot.listeners:
        reasons.append(
            stale.forwarded_reason(port, pinned.backends)
            if away
            else listeners.unbound_reason(port, forwards, shown.unanswered)
        )
    service_down = not snapshot.listeners and not forwards and not away and shown.unanswered > 0
    reasons += [listeners.listener_reason(one, port) for one in listening.judged]
    if snapshot.listeners:
        reasons += [
            reason(
                "dnat-to-other-port",
                f"A DNAT forwards UDP port {port} to {endpoint(address, target)}: that "
                "is another port; `ctfix explain "
                f"{target}` judges the server that answers those requests.",
            )
            for address, target in forwards
        ]
    reasons += forwarding.forwarding_reasons(behind)
    reasons += blindness.blindness_reasons(snapshot, blind)
    reasons += evidence.evidence_reasons(shown, snapshot)
    reasons += evidence.through_fix_reasons(shown, rewritten)
    reasons += pinned.reasons
    reasons += unanswered.unanswered_reasons(silent, snapshot.listened_seconds)
    reasons += exposure.exposure_reasons(clients, snapshot, shown, listening, rewritten)
    reasons += netfilter.netfilter_reasons(rewritten, rules)
    if snapshot.conntrack_error:
        reasons.append(
            reason("no-conntrack-evidence", f"No conntrack evidence: {snapshot.conntrack_error}.")
        )
    reasons += [
        reason("netfilter-not-read", f"Rules not read: {error}.")
        for error in snapshot.netfilter_errors
    ]
    reasons += present.history
    reasons += effect.effect_reasons(fixed, snapshot)

    verdict: Verdict
    if present.current:
        verdict = "broken"
    elif any(not cn.ok for cn in clients) or (fixed and fixed.uncovered):
        verdict = "at-risk"
    elif blindness.judged_blind(snapshot, listening, blind):
        verdict = "unknown"
    else:
        verdict = "ok"

    service_rule = listening.service_rule
    # Advice for the program it claims to be ("nothing to do") would be wrong for it.
    advice_rule = None if listening.contradicted else service_rule
    # A forwarded port's fixes belong to the port it is forwarded to (`ctfix explain` there).
    wanted = verdict in ("at-risk", "broken") and not (forwards and not snapshot.listeners)
    fixes = (
        advice.fixes_for(port, verdict, clients, advice_rule, rules, behind) if wanted else ()
    )
    if pinned.entries:
        verdict = "broken"  # stale NAT entries: a black hole now (their fix is their own)
    return Diagnosis(
        port=port,
        netns=snapshot.netns,
        verdict=verdict,
        reasons=tuple(reasons),
        listeners=snapshot.listeners,
        clients=tuple(clients),
        evidence=shown,
        rules=rules,
        fixes=recommended_first((*pinned.fixes, *fixes)),
        local_addresses=tuple(
            a.address for a in snapshot.addresses if not a.loopback and a.scope != "link"
        ),
        service=service_rule.name if service_rule else None,
        service_down=service_down,
        forwarded_to=tuple(endpoint(a, p) for a, p in forwards),
        stale_nat=pinned.findings,
        stale_entries=pinned.entries,
        forwarded_from=tuple(behind),
        fix_effect=fixed,
        tracking=blindness.tracking_of(snapshot),
        tracking_switched_on=snapshot.tracking_switched_on,
        blind=tuple(blind),
        unanswered=tuple(unanswered.service_record(f) for f in silent),
    )


__all__ = [
    "PROBLEM_DNAT_REPLY",
    "PROBLEM_DROP_REPLY",
    "PROBLEM_NOTRACK",
    "PROBLEM_SNAT_REPLY",
    "PROBLEM_SNAT_REQUEST",
    "PROBLEM_ZONE_ALONE",
    "ReasonCode",
    "connected_networks",
    "diagnose",
    "forwarded_to",
    "newest_last",
    "probe_destinations",
    "recommended_first",
    "reply_marks",
    "requests_to",
    "rule_problem",
    "uplink_lookups",
    "usable_addresses",
    "waiting_clients",
    "wrong_source_reply",
]
