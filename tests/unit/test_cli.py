"""The front door: help lists every command, errors are one line with exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ctfix.cli import COMMANDS, main


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("watch", "explain", "fix", "serve", "lab"):
        assert name in COMMANDS
        assert f"    {name} " in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("ctfix 0.")


def test_unknown_command_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "invalid choice" in err


def test_help_does_not_import_heavy_libraries() -> None:
    code = (
        "import sys\n"
        "from ctfix.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('pyroute2', 'iptc', 'yaml', 'prometheus_client', 'nftables')"
        " if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "HEAVY="


def test_short_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["-V"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("ctfix 0.")


def test_ports_may_be_udp_service_names() -> None:
    import argparse
    import socket

    from ctfix.commands.common import port_number

    assert port_number("53") == 53
    try:
        domain = socket.getservbyname("domain", "udp")
    except OSError:
        pytest.skip("no /etc/services here (netbase): service names cannot resolve")
    assert port_number("domain") == domain == 53
    for bad in ("0", "65536", "no-such-service", "d\0main", "ドメイン"):
        with pytest.raises(argparse.ArgumentTypeError):
            port_number(bad)


def test_a_bad_port_name_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["explain", "no-such-service"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no-such-service" in err
