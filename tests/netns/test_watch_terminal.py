"""`ctfix watch` as a person and as a script see it: on a terminal (a pty) a status line
shows it is alive and never mixes with finding lines; a pipe gets no control
sequence; the filters users know from `conntrack -E` and tcpdump (`--port`,
`--client`, `--service`) choose what is reported, with a real broken server.

Wildcard socat servers in the lab's host namespace answer the container's clients
from the bridge address (the seed's bug) on two ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ctfix.lab.topology import CONTAINER_V4, UPLINK_V4, Topology, udp_exchange, wait_udp_bound
from tests.netns.logs import wait_for_text

WATCH = [sys.executable, "-m", "ctfix", "watch"]
ERASE = "\r\033[K"
PORTS = (7101, 7102)


def _broken_servers(topo: Topology) -> None:
    for port in PORTS:
        socat = topo.spawn(topo.host, ["socat", f"UDP4-RECVFROM:{port},fork", "EXEC:cat"])
        wait_udp_bound(socat.pid, port)


def _ask(topo: Topology, port: int) -> None:
    exchange = udp_exchange(topo.container, UPLINK_V4, port, timeout=0.3)
    assert not exchange.answered  # the bug, as the client sees it


class Terminal:
    """A process whose stdout and stderr are one pty, as in a terminal window."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.master = master
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the other side is closed
                return
            if not chunk:
                return
            self.chunks.append(chunk)

    @property
    def screen(self) -> str:
        # The pty turns "\n" into "\r\n" (onlcr); the status line's erase is "\r\033[K".
        return b"".join(self.chunks).decode(errors="replace").replace("\r\n", "\n")

    def wait_for(self, what: str, check: Callable[[str], bool], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not check(self.screen):
            assert self.proc.poll() is None, self.screen
            assert time.monotonic() < deadline, f"never {what}: {self.screen!r}"
            time.sleep(0.05)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        self.reader.join(timeout=10)
        os.close(self.master)
        return self.screen


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLUMNS")}
    return {**env, "TERM": "xterm", **extra}


def test_on_a_terminal_a_status_line_shows_it_is_alive_and_never_mixes_with_findings(
    lab: Topology,
) -> None:
    topo = lab
    _broken_servers(topo)
    term = Terminal([*WATCH, "--netns", topo.host], _env(COLUMNS="100"))
    try:
        term.wait_for("ready", lambda s: "ctfix watch: watching " in s)
        term.wait_for("a status line", lambda s: "events/s" in s.split("watching ")[-1])
        _ask(topo, PORTS[0])
        term.wait_for("the finding", lambda s: "WRONG SOURCE" in s)
        # ... and the status line drawn again after it: it goes on living.
        term.wait_for("a status after it", lambda s: "events/s" in s.split("WRONG SOURCE")[-1])
    finally:
        screen = term.stop()
    assert ERASE in screen
    lines = screen.split("\n")
    for line in lines[:-1]:
        # What stays on the screen of each line is what follows its last erase: never
        # a status line (it is erased before any line is written), never both.
        shown = line.rsplit(ERASE, 1)[-1]
        assert "events/s" not in shown, line
    [finding] = [line.rsplit(ERASE, 1)[-1] for line in lines if "WRONG SOURCE" in line]
    assert finding.startswith("20") and f"{UPLINK_V4}:{PORTS[0]}" in finding
    assert "\033[2m" in screen  # dim: colour is allowed here
    # At exit it is gone: the last line is the summary, nothing after it.
    assert lines[-2].rsplit(ERASE, 1)[-1].startswith("summary: ") and lines[-1] in ("", ERASE)
    # At most a few redraws a second: far fewer than events or loop turns.
    assert screen.count("events/s") < 100


def test_a_pipe_and_a_dumb_terminal_get_no_control_sequence(lab: Topology) -> None:
    topo = lab
    piped = subprocess.run(
        [*WATCH, "--netns", topo.host, "--duration", "1.5"],
        capture_output=True, text=True, timeout=60, env=_env(),
    )
    assert piped.returncode == 0, piped.stderr
    assert "\033" not in piped.stderr + piped.stdout and "events/s" not in piped.stderr
    dumb = Terminal([*WATCH, "--netns", topo.host, "--duration", "1.5"], _env(TERM="dumb"))
    dumb.proc.wait(timeout=60)
    dumb.reader.join(timeout=10)
    os.close(dumb.master)
    assert "summary: " in dumb.screen and "\033" not in dumb.screen
    assert "events/s" not in dumb.screen
    plain = Terminal([*WATCH, "--netns", topo.host, "--duration", "1.5"], _env(NO_COLOR="1"))
    plain.proc.wait(timeout=60)
    plain.reader.join(timeout=10)
    os.close(plain.master)
    assert "events/s" in plain.screen and "\033[2m" not in plain.screen  # alive, no colour


@contextlib.contextmanager
def _watch_json(topo: Topology, *filters: str) -> Iterator[subprocess.Popen[str]]:
    with tempfile.NamedTemporaryFile("w+") as errors:
        proc = subprocess.Popen(
            [*WATCH, "--netns", topo.host, "--json", *filters],
            stdout=subprocess.PIPE, stderr=errors, text=True,
        )
        try:
            wait_for_text(errors, "ctfix watch: watching ")
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _stop(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=30)
    return [json.loads(line) for line in stdout.splitlines()]


def test_filters_choose_the_findings_of_every_kind(lab: Topology) -> None:
    """Three watches at once on one namespace, each with its filters; one set of
    clients asks both broken services."""
    topo = lab
    _broken_servers(topo)
    chosen = {
        "port": ["--port", str(PORTS[0])],
        "service": ["--service", f"{UPLINK_V4}:{PORTS[1]}"],
        "client": ["--client", "203.0.113.0/24"],  # nobody asks from there
        "both": ["--client", f"{CONTAINER_V4}/32", "--port", "7999", "--port", str(PORTS[1])],
    }
    with contextlib.ExitStack() as stack:
        watches = {name: stack.enter_context(_watch_json(topo, *f)) for name, f in chosen.items()}
        for port in PORTS:
            _ask(topo, port)
        # The replies' events come within milliseconds; a watch without filters, run
        # last, proves they were seen before the others stop.
        records = {name: _stop(proc) for name, proc in watches.items()}
    services = {
        name: {r["service"] for r in found if r["kind"] not in ("summary",)}
        for name, found in records.items()
    }
    assert services["port"] == {f"{UPLINK_V4}:{PORTS[0]}"}
    assert services["service"] == services["both"] == {f"{UPLINK_V4}:{PORTS[1]}"}
    assert services["client"] == set()
    summaries = {name: found[-1] for name, found in records.items()}
    assert summaries["client"]["findings"] == 0 and summaries["client"]["hidden"] == 2
    assert summaries["port"]["findings"] == 1 and summaries["port"]["hidden"] == 1
    for found in records.values():
        for record in found[:-1]:
            assert record["kind"] == "wrong-source-reply"
            assert record["client"].startswith(CONTAINER_V4)
