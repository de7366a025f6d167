"""`ctfix explain` output: a short expert write-up (text), the same for incident
documents (markdown); the JSON document with stable keys is render/explain_json.py.

Know before changing: the JSON keys are a contract (issue: port, netns, verdict,
reasons[], listeners[], clients[], evidence, rules[], fixes[]); add keys, never rename
or remove one. Text and markdown are for people: say what happens, why, the
evidence, and the fixes with their trade-offs, in that order.
"""

from __future__ import annotations

from ctfix.core.detectors.stale_nat import stale_nat_text
from ctfix.core.detectors.wrong_source_words import wrong_source_text
from ctfix.core.diagnosis import recommended_first
from ctfix.core.model import (
    ClientNetwork,
    Diagnosis,
    ForwardedService,
    Listener,
    UnansweredService,
    WrongSourceReply,
)
from ctfix.render.container import container_text

# The JSON document lives in render/explain_json.py; re-exported here, where scan and
# the tests have always found it.
from ctfix.render.explain_json import effect_json as effect_json
from ctfix.render.explain_json import explain_document as explain_document
from ctfix.render.explain_json import forwarded_json as forwarded_json
from ctfix.render.explain_json import to_json_obj as to_json_obj
from ctfix.render.explain_json import wrong_json as wrong_json
from ctfix.render.stale_nat import WHY_STALE
from ctfix.render.style import Style
from ctfix.render.width import fill

WHY = (
    "A UDP server that answers with sendto() on a socket bound to the wildcard (0.0.0.0 "
    "or ::) does not say which source address the reply should have; the kernel picks "
    "one by routing toward the client. On a host with several addresses, a client that "
    "sent to another local address gets the reply from an address it never talked to: "
    "a connect()ed client (resolvers, most UDP clients) drops it, and its kernel answers "
    "ICMP port unreachable."
)

UNANSWERED_RUNBOOK = "Runbook for unanswered requests: docs/runbooks/udp-unanswered.md"

_VERDICT_WORDS = {
    "ok": "OK",
    "at-risk": "AT RISK",
    "broken": "BROKEN",
    "unknown": "UNKNOWN (ctfix cannot see)",
}
_VERDICT_STYLE = {
    "ok": ("green", "bold"),
    "at-risk": ("yellow", "bold"),
    "broken": ("red", "bold"),
    "unknown": ("yellow", "bold"),
}
_FAMILY_WORDS = {"ipv4": "IPv4", "ipv6": "IPv6"}


def _answers(d: Diagnosis) -> str:
    """The evidence's two counts; `unanswered` is the unanswered records' sum (not
    one-way), split by reason, so that the lines below it add up to it."""
    ev = d.evidence
    fixed = f" ({ev.through_fix} through ctfix's fix)" if ev.through_fix else ""
    why: dict[str, int] = {}
    for u in d.unanswered:
        if not u.one_way:
            why[u.reason] = why.get(u.reason, 0) + u.flows
    split = ", ".join(f"{reason} {flows}" for reason, flows in why.items())
    return (
        f"requests answered from the right source: {ev.healthy}{fixed}; "
        f"requests without a usable reply: {ev.unanswered}" + (f" ({split})" if split else "")
    )


def _unanswered_line(u: UnansweredService) -> str:
    """`unanswered, no-socket: 12 requests from 3 client hosts to 198.51.100.13:53`."""
    target = f" (DNAT to {u.target})" if u.target else ""
    tail = ", one-way service: expected" if u.one_way else ""
    return (
        f"unanswered, {u.reason}{tail}: {u.flows} request{'s' if u.flows != 1 else ''} from "
        f"{u.clients} client host{'s' if u.clients != 1 else ''} to {u.service}{target}"
    )


def _listener_line(lst: Listener) -> str:
    who = lst.process or "?"
    pid = f"pid {lst.pid}" if lst.pid is not None else "owner unknown"
    address = f"[{lst.address}]" if ":" in lst.address else lst.address
    where = f"{address}:{lst.port}"
    extra = []
    if lst.family == "ipv6" and lst.address == "::":
        extra.append("v6only" if lst.v6only else "dual-stack")
    if lst.peer:
        extra.append(f"connected to {lst.peer}")
    if lst.container is not None:
        extra.append(container_text(lst.container))
    elif lst.unit:
        extra.append(lst.unit)
    others = [f"{comm or '?'} pid {pid}" for pid, comm in lst.processes if pid != lst.pid]
    if others:
        extra.append(f"shared with {', '.join(others)}")
    tail = f" ({', '.join(extra)})" if extra else ""
    return f"{who} ({pid}) {lst.state} on {where}{tail}"


def _netns_text(d: Diagnosis) -> str:
    """The namespace as given, and whose it is when a container's (and not said)."""
    ref = d.netns_container
    if ref is None or d.netns in (f"container:{ref.name}", f"container:{ref.id}"):
        return d.netns
    return f"{d.netns} ({container_text(ref)})"


def _wrong_line(w: WrongSourceReply) -> str:
    """A wrong-source record, with the container of its (latest) client if known."""
    text = wrong_source_text(w)
    return f"{text} ({container_text(w.container)})" if w.container else text


def _client_cells(cn: ClientNetwork) -> tuple[str, str, str, str, str]:
    origin = "seen" if cn.seen else "assumed"
    extra = [a for a in cn.onlink if a not in cn.addressed]
    addressed = f"{', '.join(cn.addressed) or '-'} ({origin})"
    if extra:
        # Clients may use their gateway whatever conntrack remembers (30 s).
        addressed += f", {', '.join(extra)} (on-link)"
    # Replies that leave by another uplink than their requests came in by.
    other_way = sorted({u.interface for u in cn.uplinks if not u.ok})
    problems = [f"wrong for {', '.join(cn.wrong_for)}"] if cn.wrong_for else []
    if other_way:
        problems.append(f"leaves by {cn.egress}, not {' or '.join(other_way)}")
    if cn.ok:
        status = "ok (answered, seen)" if cn.answered else "ok"
    elif problems:
        status = "; ".join(problems)
    else:
        status = "at risk"
    leaves = cn.interface or "-"
    if cn.egress_gateway and cn.egress == cn.interface:
        leaves += f" via {cn.egress_gateway}"
    return (
        cn.network,
        leaves,
        addressed,
        cn.predicted_source or "-",
        status,
    )


#: where prose is filled when the output is not a terminal
PIPE_WIDTH = 88


def _forwarded_line(f: ForwardedService) -> str:
    where = f" in {'/'.join(f.hooks)}" if f.hooks else ""
    seen = f", {f.seen} request{'s' if f.seen != 1 else ''} in conntrack" if f.seen else ""
    return f"{f.service} -> {f.target} (DNAT{where}{seen})"


def _wrap(text: str, indent: str, width: int | None, hang: str | None = None) -> str:
    """Fill text at width, never mid-word (ctfix.render.width.fill). Without a width
    (not a terminal), prose is filled at PIPE_WIDTH and a one-line record (hang
    given) stays one line, for grep and `head -1`."""
    if width is None:
        if hang is not None:
            return indent + text
        width = PIPE_WIDTH
    return fill(text, width, indent, hang)


def _headline_tail(d: Diagnosis) -> str:
    """What the verdict alone would hide: an outage, or a port served elsewhere."""
    if d.service_down:
        asked = d.evidence.unanswered
        requests = f"{asked} request{'s' if asked != 1 else ''} without a"
        if d.verdict == "ok":
            return (
                " (no wrong-source replies), but NOTHING ANSWERS: no socket on the port, "
                f"{requests} reply"
            )
        requests += " usable reply"
        # Broken (or at risk) and gone: netcat exits on the ICMP error its
        # wrong-source reply brings back.
        gone = (
            " (it answered from the wrong source, then went away)"
            if d.evidence.wrong_source
            else ""
        )
        return f", and NOTHING ANSWERS now: no socket on the port{gone}, {requests}"
    if d.forwarded_to and not d.listeners:
        return f" (forwarded by DNAT to {', '.join(d.forwarded_to)})"
    return ""


def _why(d: Diagnosis) -> list[str]:
    """The background the verdict rests on: wrong sources, stale NAT, or both."""
    exposed = any(not cn.ok for cn in d.clients)
    why = [WHY] if d.evidence.wrong_source or exposed or not d.stale_nat else []
    return [*why, *([WHY_STALE] if d.stale_nat else [])]


def _runbooks(d: Diagnosis) -> str:
    books = ["docs/runbooks/udp-wrong-source.md"] if _why(d)[0] == WHY else []
    books += ["docs/runbooks/udp-stale-nat.md"] if d.stale_nat else []
    return ", ".join(books)


def _blind(d: Diagnosis) -> list[str]:
    return [_FAMILY_WORDS[f] for f in d.blind]


def _blind_line(d: Diagnosis) -> str | None:
    """The evidence section's first line where conntrack cannot see."""
    blind = _blind(d)
    if not blind:
        return None
    return (
        f"conntrack does not track {' and '.join(blind)} here: no evidence can exist for "
        f"{'them' if len(blind) > 1 else 'it'} (use --listen S, or ctfix watch --track)"
    )


def _no_wrong_source(d: Diagnosis) -> str:
    """"No wrong-source replies", said only as far as the table can show them."""
    blind = _blind(d)
    if not blind:
        return "no wrong-source replies in the table"
    seen = [_FAMILY_WORDS[f] for f in ("ipv4", "ipv6") if d.tracking.get(f) is not False]
    if not seen:
        return "no wrong-source reply can show in the table (nothing is tracked)"
    return f"no {' or '.join(seen)} wrong-source replies in the table (the only ones it can show)"


def render_text(d: Diagnosis, style: Style | None = None, width: int | None = None) -> str:
    """The write-up for people, every line wrapped at `width` (a terminal's: see
    ctfix.render.width.terminal_width); without one, as for a pipe (see `_wrap`)."""
    s = style or Style(False)
    w = width
    verdict = s(_VERDICT_WORDS[d.verdict], *_VERDICT_STYLE[d.verdict])
    tail = _headline_tail(d)
    if d.service_down:
        tail = s(tail, "red", "bold")
    headline = f"UDP port {d.port} in namespace {_netns_text(d)}: {verdict}{tail}"
    out = [_wrap(headline, "", w, "  "), ""]

    out.append(s("What happens", "bold"))
    for reason in d.reasons:
        out.append(_wrap(reason.text, "  ", w).replace("  ", "- ", 1))
    if d.verdict in ("at-risk", "broken"):
        out += ["", s("Why", "bold"), *(_wrap(text, "  ", w) for text in _why(d))]

    out += ["", s("Sockets on the port", "bold")]
    out += [_wrap(_listener_line(lst), "  ", w, "      ") for lst in d.listeners] or ["  none"]
    if d.forwarded_from:
        out += ["", s("Services DNAT'd to the port", "bold")]
        out += [_wrap(_forwarded_line(f), "  ", w, "      ") for f in d.forwarded_from]

    if d.clients:
        heading = (
            "Client networks (reply source from `ip route get CLIENT ipproto udp "
            f"sport {d.port}`)"
        )
        out += ["", _wrap(s(heading, "bold"), "", w, "  ")]
        rows = [("network", "leaves by", "clients send to", "reply from", "")]
        rows += [_client_cells(cn) for cn in d.clients]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        if w is not None and sum(widths) + 2 * 4 > w:
            # Too wide for the terminal even without the status: a network per block.
            for network, leaves, send_to, reply_from, status in rows[1:]:
                said = f"{network}: leaves by {leaves}, reply from {reply_from}"
                out.append(_wrap(said, "  ", w, "      "))
                out.append(_wrap(f"clients send to {send_to}", "      ", w, "        "))
                if status:
                    shown = s(status, "red") if status != "ok" else status
                    out.append(_wrap(shown, "      ", w, "        "))
            rows = []
        for index, row in enumerate(rows):
            cells = "  " + "  ".join(row[i].ljust(widths[i]) for i in range(4))
            status = s(row[4], "red") if index and row[4] != "ok" else row[4]
            if w is not None and len(cells.rstrip()) + 2 + len(row[4]) > w:
                # Too wide for the terminal: the status goes under its row.
                out.append(cells.rstrip())
                if row[4]:
                    out.append(_wrap(status, "      ", w))
            else:
                out.append(f"{cells}  {status}".rstrip())

    ev = d.evidence
    out += ["", s("Evidence (conntrack, this port)", "bold")]
    blind = _blind_line(d)
    if blind:
        out.append(_wrap(s(blind, "yellow"), "  ", w, "  "))
    if ev.wrong_source:
        for wrong in ev.wrong_source:
            line = f"{s('wrong source', 'red')}: {_wrong_line(wrong)}"
            out.append(_wrap(line, "  ", w, "      "))
    else:
        out.append(_wrap(_no_wrong_source(d), "  ", w, "      "))
    out.append(_wrap(_answers(d), "  ", w, "      "))
    for stale in d.stale_nat:
        out.append(_wrap(f"{s('stale NAT', 'red')}: {stale_nat_text(stale)}", "  ", w, "      "))
    out += [_wrap(_unanswered_line(u), "  ", w, "      ") for u in d.unanswered]
    if any(not u.one_way for u in d.unanswered):
        out.append(f"  {UNANSWERED_RUNBOOK}")

    if d.rules:
        out += ["", s("Netfilter rules on the port", "bold")]
        for r in d.rules:
            out.append(_wrap(f"{r.backend} {r.table} {r.chain}: {r.rule}", "  ", w, "      "))
            if r.problem:
                out.append(_wrap(f"cannot help: {r.problem}", "      ", w))

    if d.fixes:
        out += ["", s("How to fix it", "bold")]
        for fix in recommended_first(d.fixes):
            mark = s("recommended", "green") + " " if fix.recommended else ""
            out.append(_wrap(f"[{fix.method}] {mark}{fix.summary}", "  ", w, "      "))
            out.append(_wrap(fix.detail, "      ", w))
        runbook = f"Runbook: {_runbooks(d)}; live view: ctfix watch"
        out += ["", _wrap(runbook, "  ", w, "  ")]
    return "\n".join(out) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(d: Diagnosis) -> str:
    out = [
        f"## UDP port {d.port} (namespace `{_netns_text(d)}`): **{_VERDICT_WORDS[d.verdict]}**"
        + _headline_tail(d),
        "",
    ]
    out += ["### What happens", ""]
    out += [f"- {reason.text}" for reason in d.reasons]
    if d.verdict in ("at-risk", "broken"):
        out += ["", "### Why", ""]
        out += [line for text in _why(d) for line in (text, "")][:-1]
    out += ["", "### Sockets on the port", ""]
    out += [f"- `{_listener_line(lst)}`" for lst in d.listeners] or ["- none"]
    if d.forwarded_from:
        out += ["", "### Services DNAT'd to the port", ""]
        out += [f"- `{_forwarded_line(f)}`" for f in d.forwarded_from]
    if d.clients:
        out += [
            "",
            "### Client networks",
            "",
            f"Reply source as `ip route get CLIENT ipproto udp sport {d.port}` predicts it.",
            "",
            "| network | leaves by | clients send to | reply from | |",
            "|---|---|---|---|---|",
        ]
        for cn in d.clients:
            cells = _client_cells(cn)
            out.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    ev = d.evidence
    out += ["", "### Evidence (conntrack)", ""]
    blind = _blind_line(d)
    if blind:
        out.append(f"- **{blind}**")
    for w in ev.wrong_source:
        out.append(f"- wrong source: {_wrong_line(w)}")
    if not ev.wrong_source:
        out.append(f"- {_no_wrong_source(d)}")
    out.append(f"- {_answers(d)}")
    out += [f"- stale NAT: {stale_nat_text(stale)}" for stale in d.stale_nat]
    out += [f"- {_unanswered_line(u)}" for u in d.unanswered]
    if any(not u.one_way for u in d.unanswered):
        out.append(f"- {UNANSWERED_RUNBOOK}")
    if d.rules:
        out += ["", "### Netfilter rules on the port", ""]
        for r in d.rules:
            out.append(f"- {r.backend} `{r.table}` `{r.chain}`: `{r.rule}`")
            if r.problem:
                out.append(f"  - **cannot help**: {r.problem}")
    if d.fixes:
        out += ["", "### How to fix it", ""]
        for fix in recommended_first(d.fixes):
            rec = " *(recommended)*" if fix.recommended else ""
            out.append(f"- **{fix.method}**{rec}: {fix.summary}")
            detail = fix.detail.strip().splitlines()
            out += [f"  {line}" if line.strip() else "" for line in detail]
        books = ", ".join(f"`{book}`" for book in _runbooks(d).split(", "))
        out += ["", f"Runbook: {books}; live view: `ctfix watch`."]
    return "\n".join(out) + "\n"
