"""Issue 8 in pure code: client networks, history vs news, port-changing protocols,
evidence beats prediction, blindness. Hand-built entries and snapshots, no kernel."""

from __future__ import annotations

import io
import json
import pathlib
import socket
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from ctfix.core import decode, rules
from ctfix.core.clientnet import ClientNetworks, connected
from ctfix.core.decode import IPS_SEEN_REPLY, NEW, CtEntry, CtEvent, CtTuple
from ctfix.core.detectors import Change
from ctfix.core.detectors.wrong_source import WrongSourceDetector
from ctfix.core.diagnosis import diagnose, waiting_clients
from ctfix.core.model import Listener
from ctfix.core.snapshot import ConfigFile, LocalAddress, NetfilterRule
from ctfix.platform import rules_files
from ctfix.render.explain import render_text, to_json_obj
from ctfix.render.watch import WatchRenderer
from tests.unit.test_diagnose import BRIDGE, CLIENT, NC, PORT, UPLINK, snapshot

# -- one client network definition -----------------------------------------------------


def nets(*addresses: tuple[str, int, str, str]) -> ClientNetworks:
    return ClientNetworks(connected(addresses))


SPLIT = nets(
    ("127.0.0.1", 8, "lo", "host"),
    ("203.0.113.5", 32, "lo", "global"),  # an anycast address on lo
    ("192.0.2.1", 25, "br0", "global"),
    ("192.0.2.129", 25, "eth0", "global"),
    ("fe80::1", 64, "br0", "link"),
    ("2001:db8:1::1", 64, "br0", "global"),
    ("198.51.100.7", 32, "wg0", "global"),  # the local end of a point-to-point link
)


def test_connected_client_networks_leave_out_loopback_host_prefixes_and_link_local() -> None:
    assert [c.network for c in SPLIT.networks] == [
        "192.0.2.0/25",
        "192.0.2.128/25",
        "2001:db8:1::/64",
    ]


def test_a_shared_slash_24_gives_two_client_networks() -> None:
    assert SPLIT.of("192.0.2.3") == ("192.0.2.0/25", "br0")
    assert SPLIT.of("192.0.2.130") == ("192.0.2.128/25", "eth0")


def test_routed_clients_fall_back_to_a_block_that_overlaps_no_connected_network() -> None:
    assert SPLIT.network("203.0.113.77") == "203.0.113.0/24"
    assert SPLIT.network("2001:db8:9::5") == "2001:db8:9::/64"
    half = nets(("192.0.2.1", 25, "br0", "global"))
    # Its /24 would hold the connected /25: the routed client gets the other half.
    assert half.network("192.0.2.200") == "192.0.2.128/25"
    assert ClientNetworks().network("192.0.2.3") == "192.0.2.0/24"  # nothing connected


def test_the_most_specific_connected_network_wins() -> None:
    nested = nets(("192.0.2.1", 24, "br0", "global"), ("192.0.2.65", 26, "br1", "global"))
    assert nested.of("192.0.2.70") == ("192.0.2.64/26", "br1")
    assert nested.of("192.0.2.3") == ("192.0.2.0/24", "br0")


def test_watch_and_explain_group_by_the_same_networks() -> None:
    addresses = (
        LocalAddress("br0", "192.0.2.1", 25, "ipv4"),
        LocalAddress("eth0", "192.0.2.129", 25, "ipv4"),
        LocalAddress("lo", "203.0.113.5", 32, "ipv4"),
    )
    flows = (
        request("192.0.2.129", "192.0.2.3", 4000),
        reply("192.0.2.1", "192.0.2.3", 4000),
        request("192.0.2.1", "192.0.2.130", 4001),
        reply("192.0.2.129", "192.0.2.130", 4001),
    )
    d = diagnose(snapshot(NC, flows=flows, addresses=addresses, probes={}, route_choices=()))
    explained = {w.service: w.client_network for w in d.evidence.wrong_source}
    watch = WrongSourceDetector(local_addresses=frozenset(a.address for a in addresses))
    watch.networks = nets(*((a.address, a.prefixlen, a.interface, a.scope) for a in addresses))
    for entry in flows:
        watch.feed(CtEvent(NEW, entry), 1.0)
    watched = {f.service: f.client_network for f in watch.found}
    assert (
        explained
        == watched
        == {
            f"192.0.2.129:{PORT}": "192.0.2.0/25",
            f"192.0.2.1:{PORT}": "192.0.2.128/25",
        }
    )
    assert not any(cn.network.endswith("/32") for cn in d.clients)


# -- history vs news ---------------------------------------------------------------------


def udp(src: str, dst: str, sport: int, dport: int) -> CtTuple:
    return CtTuple(src, dst, sport, dport, 17, socket.AF_INET)


def request(
    addressed: str, client: str = CLIENT, cport: int = 40000, *, status: int = 0
) -> CtEntry:
    orig, back = udp(client, addressed, cport, PORT), udp(addressed, client, PORT, cport)
    return CtEntry(orig, back, status=status, timeout=30)


def reply(
    source: str,
    client: str = CLIENT,
    cport: int = 40000,
    sport: int = PORT,
    *,
    status: int = 0,
    start: int | None = None,
) -> CtEntry:
    orig, back = udp(source, client, sport, cport), udp(client, source, cport, sport)
    return CtEntry(orig, back, status=status, timeout=30, start=start)


LOCAL = frozenset({BRIDGE, UPLINK})
STARTED = 1_000.0


def test_a_start_up_dump_is_history_and_events_are_news() -> None:
    d = WrongSourceDetector(local_addresses=LOCAL)
    d.since = STARTED
    found = d.examine([request(UPLINK, cport=1), reply(BRIDGE, cport=1)], STARTED)
    assert [(f.existing, f.first_seen) for f, _c in found] == [(True, None)]
    d.dumps_are_history = False
    d.feed(CtEvent(NEW, request(UPLINK, cport=2)), STARTED + 1)
    live = d.feed(CtEvent(NEW, reply(BRIDGE, cport=2)), STARTED + 1)
    assert live is not None and live[1] is Change.NEW and not live[0].existing
    # Each is aggregated apart: one reply in the table, one while watching.
    assert [(f.existing, f.count) for f in d.found] == [(False, 1), (True, 1)]
    assert (live[0].first_seen, live[0].last_seen) == (STARTED + 1, STARTED + 1)


def test_the_kernels_timestamp_decides_and_gives_the_real_age() -> None:
    d = WrongSourceDetector(local_addresses=LOCAL)
    d.since = STARTED
    old = reply(BRIDGE, cport=1, start=int((STARTED - 20) * 1e9))
    new = reply(BRIDGE, cport=2, start=int((STARTED + 5) * 1e9))
    d.examine([request(UPLINK, cport=1), old, request(UPLINK, cport=2), new], STARTED + 6)
    [history] = d.history.values()
    [live] = d.findings.values()
    assert (history.first_seen, history.last_seen) == (STARTED - 20, STARTED - 20)
    assert live.first_seen == STARTED + 6 and not live.existing


def test_a_resync_after_lost_events_is_news_without_timestamps() -> None:
    d = WrongSourceDetector(local_addresses=LOCAL)
    d.since, d.dumps_are_history = STARTED, False
    [(finding, change)] = d.examine([request(UPLINK), reply(BRIDGE)], STARTED + 3, complete=True)
    assert not finding.existing and change is Change.NEW


def test_watch_prints_existing_findings_apart_and_counts_them_apart() -> None:
    d = WrongSourceDetector(local_addresses=LOCAL)
    d.since = STARTED
    d.examine([request(UPLINK), reply(BRIDGE)], STARTED)
    out = io.StringIO()
    renderer = WatchRenderer(out, json_lines=True, netns="ns")
    renderer.started = STARTED
    renderer.existing(list(d.history.values()))
    [record] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert record["existing"] is True and record["first_seen"] is None
    assert record["seen_before"] == "1970-01-01T00:16:40.000Z"
    text = io.StringIO()
    WatchRenderer(text, json_lines=False, netns="ns").existing(list(d.history.values()))
    assert text.getvalue().count("\n") == 2  # a heading, then the finding


# -- port-changing protocols ------------------------------------------------------------


def test_a_new_port_by_design_is_an_answer_and_a_wrong_address_one_finding() -> None:
    asked: list[int] = []

    def other_port(port: int) -> bool:
        asked.append(port)
        return port == 69

    d = WrongSourceDetector(local_addresses=LOCAL, other_port=other_port, track_answers=True)
    tftp = [
        (
            request(UPLINK, cport=c)._replace(
                orig=udp(CLIENT, UPLINK, c, 69), reply=udp(UPLINK, CLIENT, 69, c)
            )
        )
        for c in (1, 2, 3, 4)
    ]
    d.feed(CtEvent(NEW, tftp[0]), 1.0)
    assert d.feed(CtEvent(NEW, reply(UPLINK, cport=1, sport=40001)), 1.0) is None
    assert d.answered == {(CLIENT, 1): False}  # answered, from the right address
    for n, entry in enumerate(tftp[1:], start=2):
        d.feed(CtEvent(NEW, entry), 1.0)
        d.feed(CtEvent(NEW, reply(BRIDGE, cport=n, sport=40000 + n)), 1.0)
    [finding] = d.found
    assert (finding.actual_source, finding.mismatch, finding.count) == (BRIDGE, "address+port", 3)
    assert finding.replies_from_other_port and finding.service == f"{UPLINK}:69"
    assert set(asked) == {69}


def test_a_reply_entry_the_client_already_answered_is_found_in_a_dump() -> None:
    """TFTP's client ACKs the DATA's new port: that reply entry is replied in a dump."""
    d = WrongSourceDetector(local_addresses=LOCAL, other_port=lambda port: True, track_answers=True)
    acked = reply(UPLINK, cport=7, sport=41000, status=IPS_SEEN_REPLY)
    d.examine([request(UPLINK, cport=7), acked], 1.0)
    assert d.answered == {(CLIENT, 7): False} and not d.found


def test_explain_looks_up_replies_of_requests_left_waiting() -> None:
    flows = [
        request(UPLINK, cport=1),
        request(UPLINK, cport=2, status=IPS_SEEN_REPLY),
        request(UPLINK, cport=3),
        reply(BRIDGE, cport=3),
    ]
    assert waiting_clients(flows, PORT, set(LOCAL)) == {(CLIENT, 1)}


# -- evidence beats prediction -----------------------------------------------------------

UNKNOWN = Listener(
    "0.0.0.0", PORT, "ipv4", "listening", pid=7, process="myecho", cmdline=("/opt/myecho",)
)


def test_a_server_seen_answering_from_what_routing_would_not_pick_is_ok() -> None:
    flows = (
        request(UPLINK, cport=1, status=IPS_SEEN_REPLY),
        request(BRIDGE, cport=2, status=IPS_SEEN_REPLY),
    )
    d = diagnose(snapshot(UNKNOWN, flows=flows))
    codes = [r.code for r in d.reasons]
    assert d.verdict == "ok", d.reasons
    assert "observed-right-source" in codes
    assert not {"wildcard-socket", "client-network-exposed", "only-matching-clients-seen"} & set(
        codes
    )
    container = next(cn for cn in d.clients if cn.network == "192.0.2.0/24")
    assert set(container.answered) == {UPLINK, BRIDGE} and container.wrong_for == ()
    assert d.fixes == ()


def test_answers_from_the_predicted_address_prove_nothing() -> None:
    d = diagnose(snapshot(UNKNOWN, flows=(request(BRIDGE, cport=2, status=IPS_SEEN_REPLY),)))
    assert "observed-right-source" not in [r.code for r in d.reasons]
    text = next(r.text for r in d.reasons if r.code == "only-matching-clients-seen")
    assert UPLINK in text  # names the address nobody used, that would get no answer


def test_after_a_working_snat_zone_no_reason_claims_no_answer() -> None:
    def rule(actions: set[str], nat_to: str | None = None) -> NetfilterRule:
        return NetfilterRule(
            "nftables",
            "inet",
            f"ctfix_{PORT}",
            "c",
            "r",
            frozenset(actions),
            matches_sport=True,
            nat_to=nat_to,
        )

    zoned = CtEntry(udp(BRIDGE, CLIENT, PORT, 5), udp(CLIENT, UPLINK, 5, PORT), zone=51185)
    flows = (request(UPLINK, cport=5), zoned, request(BRIDGE, cport=6, status=IPS_SEEN_REPLY))
    d = diagnose(snapshot(NC, flows=flows, netfilter=(rule({"zone"}), rule({"snat"}, UPLINK))))
    codes = [r.code for r in d.reasons]
    assert d.verdict == "ok" and "snat-zone-in-place" in codes
    assert "only-matching-clients-seen" not in codes and "client-network-exposed" not in codes


CONFIGURED = Listener(
    "0.0.0.0",
    PORT,
    "ipv4",
    "listening",
    pid=9,
    process="myecho",
    cmdline=("/opt/myecho", "-c", "/etc/myecho.conf"),
)
ENTRY = f"""version: 1
services:
  - id: myecho
    name: MyEcho
    processes: [myecho]
    ports: [{PORT}]
    affected_when_wildcard: true
    fixed_if_config:
      - file: /etc/myecho*.conf
        pattern: '^\\s*reply-from-destination\\s*=\\s*yes'
    why: It answers with sendto.
    fix: Set reply-from-destination = yes.
    reference: https://example.org/myecho
    confidence: high
"""


def test_a_fix_in_the_config_file_is_in_effect_and_not_recommended(tmp_path: Path) -> None:
    (tmp_path / "myecho.yaml").write_text(ENTRY)
    kb = rules_files.load([tmp_path], builtin=True)
    off = ConfigFile(9, "/etc/myecho.conf", "# reply-from-destination = yes\n")
    d = diagnose(snapshot(CONFIGURED, config_files=(off,)), kb)
    assert d.verdict == "at-risk" and any(
        f.method == "bind" and "MyEcho" in f.summary for f in d.fixes
    )
    on = replace(off, text="log = quiet\n  reply-from-destination = yes\n")
    d = diagnose(snapshot(CONFIGURED, config_files=(on,)), kb)
    assert d.verdict == "ok" and d.fixes == ()
    [text] = [r.text for r in d.reasons if r.code == "fix-already-in-effect"]
    assert "/etc/myecho.conf" in text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("'x'", "'fixed_if_config' must be a list"),
        ("[{file: etc/x.conf, pattern: a}]", "'file' must be an absolute path"),
        ("[{file: /etc/x, pattern: '['}]", "'pattern' is not a valid regular expression"),
        ("[{file: /etc/x}]", "lacks required key(s) 'pattern'"),
    ],
)
def test_bad_fixed_if_config_is_one_line_naming_the_line(
    tmp_path: Path, value: str, message: str
) -> None:
    text = ENTRY.replace(
        "    fixed_if_config:\n      - file: /etc/myecho*.conf\n"
        "        pattern: '^\\s*reply-from-destination\\s*=\\s*yes'\n",
        f"    fixed_if_config: {value}\n",
    )
    with pytest.raises(rules.RuleError) as err:
        rules.parse(text, "bad.yaml")
    assert message in str(err.value) and str(err.value).startswith("bad.yaml:")


# -- blindness ---------------------------------------------------------------------------

BLIND = {"ipv4": False, "ipv6": False}


def test_blind_is_never_ok_for_a_wildcard_socket() -> None:
    kb = rules_files.load(None, builtin=True)
    dnsmasq = replace(NC, process="dnsmasq", cmdline=("dnsmasq",))
    assert diagnose(snapshot(dnsmasq), kb).verdict == "ok"  # trusted, and it could be caught
    d = diagnose(snapshot(dnsmasq, tracking=BLIND), kb)
    assert d.verdict == "unknown" and "not-tracked" in [r.code for r in d.reasons]
    assert to_json_obj(d)["tracking"] == BLIND
    assert "no wrong-source reply can show" in render_text(d)
    assert d.fixes == ()


def test_blind_with_a_prediction_of_risk_stays_at_risk_and_a_bound_socket_ok() -> None:
    assert diagnose(snapshot(NC, tracking=BLIND)).verdict == "at-risk"
    bound = replace(NC, address=BRIDGE)
    assert diagnose(snapshot(bound, tracking=BLIND)).verdict == "ok"
    # Only the families the port serves matter.
    assert (
        diagnose(snapshot(bound, tracking={"ipv4": True, "ipv6": False})).reasons
        == diagnose(snapshot(bound, tracking={"ipv4": True, "ipv6": True})).reasons
    )


# -- a documented first-request caveat (QA F18) -------------------------------------------


def test_one_wrong_reply_of_a_program_with_a_first_reply_caveat_is_that_caveat() -> None:
    kb = rules_files.load(None, builtin=True)
    tftpd = replace(NC, process="in.tftpd", cmdline=("/usr/sbin/in.tftpd", "-L", "-s", "/srv"))
    one = (request(UPLINK, cport=1), reply(BRIDGE, cport=1))
    d = diagnose(snapshot(tftpd, flows=one), kb)
    codes = [r.code for r in d.reasons]
    assert "first-reply-caveat" in codes and "knowledge-base-contradicted" not in codes
    assert d.verdict == "ok" and len(d.evidence.wrong_source) == 1
    # A second wrong reply is more than the caveat: the evidence wins.
    two = (*one, request(UPLINK, cport=2), reply(BRIDGE, cport=2))
    d = diagnose(snapshot(tftpd, flows=two), kb)
    codes = [r.code for r in d.reasons]
    assert "knowledge-base-contradicted" in codes and "first-reply-caveat" not in codes
    assert d.verdict == "broken"
    # atftpd's entry documents no such caveat: its one wrong reply contradicts it.
    atftpd = replace(NC, process="atftpd", cmdline=("/usr/sbin/atftpd", "/srv"))
    d = diagnose(snapshot(atftpd, flows=one), kb)
    assert "knowledge-base-contradicted" in [r.code for r in d.reasons]
    assert d.verdict == "broken"


# -- the decoder: CTA_TIMESTAMP --------------------------------------------------------


def test_the_kernels_entry_start_time_is_decoded_on_both_paths() -> None:
    records = json.loads(
        (pathlib.Path(__file__).parent / "fixtures" / "ctnetlink_messages.json").read_text()
    )
    recorded = next(r for r in records if r["source"] == "event")
    raw = bytearray(bytes.fromhex(recorded["hex"]))
    length = struct.unpack_from("=I", raw)[0]
    first = raw[:length]
    start = 1_764_612_000_123_456_789
    stamp = decode.nla(
        decode.CTA_TIMESTAMP | decode.NLA_F_NESTED, decode.nla(1, struct.pack(">Q", start))
    )
    message = first + stamp
    struct.pack_into("=I", message, 0, len(message))
    for fast in (True, False):
        [event] = decode.decode(bytes(message), fast=fast).events
        assert event.entry.start == start
    assert decode.decode(bytes(first)).events[0].entry.start is None


def test_a_reply_made_after_the_subscription_is_news_even_when_a_dump_shows_it_first() -> None:
    """explain --listen: the first dump may show a reply whose NEW event is still queued."""
    d = WrongSourceDetector(local_addresses=LOCAL)
    d.since = STARTED
    d.fresh_ids = {7}
    late = reply(BRIDGE, cport=3)._replace(id=7)
    [(finding, _change)] = d.examine([request(UPLINK, cport=3), late], STARTED + 1)
    assert not finding.existing
    assert d.feed(CtEvent(NEW, late), STARTED + 1) is None  # the same entry: counted once
