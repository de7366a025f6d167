"""watch's filters (`--port`, `--client`, `--service`): what they select, that bad values
are one line and exit 2, and that the one event filter (the unanswered detector's
requests, by service) selects exactly what filtering its findings would."""

from __future__ import annotations

import io
import ipaddress
import json
import socket

import pytest

from ctfix.cli import main
from ctfix.commands.watch_report import Reporter
from ctfix.core.decode import DESTROY, NEW, CtEntry, CtEvent, CtTuple
from ctfix.core.detectors.unanswered import UnansweredDetector
from ctfix.core.detectors.wrong_source import WrongSourceDetector, WrongSourceFinding
from ctfix.core.watch_filter import parse_client, parse_service, selection
from ctfix.render.watch import WatchRenderer

SERVER = "198.51.100.13"
OTHER = "198.51.100.14"


def udp(src: str, sport: int, dst: str, dport: int, *, ct_id: int | None = None) -> CtEntry:
    fam = socket.AF_INET6 if ":" in src else socket.AF_INET
    orig = CtTuple(src, dst, sport, dport, 17, fam)
    reply = CtTuple(dst, src, dport, sport, 17, fam)
    return CtEntry(orig, reply, 0, 0, None, 30, ct_id)


# -- parsing ----------------------------------------------------------------------------


def test_clients_and_services_parse_as_users_write_them() -> None:
    assert parse_client("192.0.2.0/24") == ipaddress.ip_network("192.0.2.0/24")
    assert parse_client("192.0.2.3") == ipaddress.ip_network("192.0.2.3/32")
    assert parse_client("192.0.2.3/24") == ipaddress.ip_network("192.0.2.0/24")
    assert parse_client("2001:db8::/32") == ipaddress.ip_network("2001:db8::/32")
    # A dual-stack socket's view of an IPv4 client is that client.
    assert parse_client("::ffff:192.0.2.3") == ipaddress.ip_network("192.0.2.3/32")
    assert parse_service("198.51.100.13:53") == (SERVER, 53)
    assert parse_service("198.51.100.13") == (SERVER, None)
    assert parse_service("[2001:DB8::0:1]:53") == ("2001:db8::1", 53)
    assert parse_service("2001:db8::1") == ("2001:db8::1", None)
    for bad in ("nope", "10.0.0.0/33", ""):
        with pytest.raises(ValueError):
            parse_client(bad)
    for bad in ("nope", "198.51.100.13:99999", "198.51.100.13:0", "[2001:db8::1]", "a:b"):
        with pytest.raises(ValueError):
            parse_service(bad)


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["--port", "70000"], "70000"),
        (["--port", "no-such-service"], "no-such-service"),
        (["--client", "192.0.2.0/33"], "192.0.2.0/33"),
        (["--service", "198.51.100.13:99999"], "99999"),
        (["--max-netns", "0"], "0"),
        (["--all-netns", "--track"], "--track"),
        (["--all-netns", "--netns", "web"], "--all-netns"),
    ],
)
def test_bad_filters_and_combinations_are_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], word: str
) -> None:
    try:
        status = main(["watch", *argv])
    except SystemExit as exc:  # argparse's own errors
        status = int(exc.code or 0)
    assert status == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and word in err, err
    assert "Traceback" not in err


# -- what they select ---------------------------------------------------------------------


def wrong_source_finding(client: str, port: int = 53) -> WrongSourceFinding:
    d = WrongSourceDetector(local_addresses=frozenset({SERVER, "192.0.2.1"}))
    d.feed(CtEvent(NEW, udp(client, 4000, SERVER, port)), 1.0)
    found = d.feed(CtEvent(NEW, udp("192.0.2.1", port, client, 4000)), 1.1)
    assert found is not None
    return found[0]


def test_options_narrow_each_other_and_values_are_alternatives() -> None:
    finding = wrong_source_finding("192.0.2.3")
    assert selection().selects(finding)
    chosen = [
        selection(ports=[53]),
        selection(ports=[123, 53]),
        selection(clients=[parse_client("192.0.2.0/24")]),
        selection(services=[(SERVER, None)]),
        selection(services=[(OTHER, None), (SERVER, 53)]),
        selection(ports=[53], clients=[parse_client("192.0.2.3")], services=[(SERVER, 53)]),
    ]
    left_out = [
        selection(ports=[123]),
        selection(clients=[parse_client("203.0.113.0/24")]),
        selection(clients=[parse_client("2001:db8::/32")]),
        selection(services=[(SERVER, 123)]),
        selection(ports=[53], clients=[parse_client("203.0.113.0/24")]),
    ]
    assert all(s.selects(finding) for s in chosen)
    assert not any(s.selects(finding) for s in left_out)


def test_a_finding_made_by_another_client_shows_once_a_selected_client_counts_in_it() -> None:
    """--client 192.0.2.4: the wrong-source finding (192.0.2.0/24) was made by .3 and
    is not shown; .4's reply makes it the user's: printed then, as new."""
    out = io.StringIO()
    renderer = WatchRenderer(out, json_lines=True, netns="ns")
    report = Reporter(renderer, None, selection(clients=[parse_client("192.0.2.4")]))
    d = WrongSourceDetector(local_addresses=frozenset({SERVER, "192.0.2.1"}))
    for client, sport in (("192.0.2.3", 4000), ("192.0.2.4", 4001), ("192.0.2.3", 4002)):
        d.feed(CtEvent(NEW, udp(client, sport, SERVER, 53)), 1.0)
        report(d.feed(CtEvent(NEW, udp("192.0.2.1", 53, client, sport)), 1.1))
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["client"] for r in records] == ["192.0.2.4:4001"]
    live, hidden = report.live(list(d.found))
    [finding] = live
    assert isinstance(finding, WrongSourceFinding) and finding.count == 3 and hidden == 0
    # The same watch with a client that never asked: nothing shown, one hidden.
    nobody = Reporter(renderer, None, selection(clients=[parse_client("203.0.113.9")]))
    assert nobody.live(list(d.found)) == ([], 1)


# -- the event filter is exact ---------------------------------------------------------------


def _stream() -> list[CtEvent]:
    """Unanswered requests to several services, from several clients; some entries
    first found in the start-up dump (DUMPED), then ended (DESTROY)."""
    events = []
    services = [(SERVER, 53), (SERVER, 123), (OTHER, 53), ("2001:db8::13", 53)]
    ct_id = 0
    for round_ in range(3):
        for client in ("192.0.2.3", "192.0.2.4", "2001:db8:1::3"):
            for address, port in services:
                if (":" in client) != (":" in address):
                    continue
                ct_id += 1
                events.append(CtEvent(DESTROY, udp(client, 5000 + round_, address, port,
                                                   ct_id=ct_id)))
    return events


@pytest.mark.parametrize(
    "chosen",
    [
        selection(ports=[53]),
        selection(services=[(SERVER, None)]),
        selection(services=[(OTHER, 53), ("2001:db8::13", 53)]),
        selection(ports=[123], services=[(SERVER, None)]),
    ],
)
def test_dropping_other_services_requests_before_classification_changes_nothing(
    chosen: object,
) -> None:
    from ctfix.core.watch_filter import Selection

    assert isinstance(chosen, Selection)
    local = frozenset({SERVER, OTHER, "2001:db8::13"})
    events = _stream()
    dump = [e.entry for e in events[:4]]

    def run(prefilter: bool) -> list[tuple[str, str, int, int, bool]]:
        detector = UnansweredDetector(local_addresses=local, remember=True)
        fed = chosen.requests(detector) if prefilter else detector
        fed.examine(dump, 0.5)
        for event in events:
            fed.feed(event, 1.0)
        kept = [f for f in detector.found if chosen.selects(f)]
        return sorted((f.service, f.reason, f.flows, f.clients, f.existing) for f in kept)

    assert run(prefilter=True) == run(prefilter=False) != []
