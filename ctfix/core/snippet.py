"""A knowledge-base snippet filled in for this host: the port and the addresses its
clients used, instead of the lab's examples. Pure.

A snippet (rules/*.yaml `snippet:`) may hold these placeholders:

- `{port}`: the port explained;
- `{address}`, `{address4}`, `{address6}`: a local address the clients used (any
  family, IPv4 only, IPv6 only); `{endpoint}`: `ADDRESS:PORT`, `[ADDRESS]:PORT` for
  IPv6; `{network}`: a client network; `{interface}`: an interface clients come in by.
  A line holding one of them is written once per value (none of the family: the line
  is left out, unless nothing at all is known; then the placeholder's name stays, in
  capitals, for the reader to fill in);
- `{addresses}`: every such address, separated by spaces, on one line; `{networks}`:
  every client network, separated by ", ";
- `{for address}` ... `{end}` (alone on their lines): the lines between are written
  once per address (a config block per address), `{address}` in them being that one.

Any other brace is the config's own (`listen {`, `{{ GetInterfaceIP }}`) and stays.

Know before changing: a snippet is printed as commands and configuration for this host,
so a value that is not this host's must never be filled in; `check` runs when a rules
file is loaded, so a typo in a placeholder is a `file:line` error, not a silent `{adress}`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: placeholders written once per value, and how each value is told from the address
_EACH: dict[str, Callable[[SnippetValues], tuple[str, ...]]] = {
    "address": lambda v: v.addresses,
    "address4": lambda v: tuple(a for a in v.addresses if ":" not in a),
    "address6": lambda v: tuple(a for a in v.addresses if ":" in a),
    "endpoint": lambda v: tuple(
        f"[{a}]:{v.port}" if ":" in a else f"{a}:{v.port}" for a in v.addresses
    ),
    "network": lambda v: v.networks,
    "interface": lambda v: v.interfaces,
}
_ONCE = ("port", "addresses", "networks")
_PLACEHOLDER = re.compile(r"\{(" + "|".join((*_EACH, *_ONCE)) + r")\}")
#: what looks like a placeholder but is none (a typo): letters alone, lower case
#: (not `{{ x }}` templates, nor `${var}` / `%{var}` expansions)
_LOOKALIKE = re.compile(r"(?<![{$%])\{([a-z][a-z0-9_]*)\}(?!\})")
_FOR = re.compile(r"^\s*\{for address\}\s*$")
_END = re.compile(r"^\s*\{end\}\s*$")


@dataclass(frozen=True, slots=True)
class SnippetValues:
    """What a snippet is filled with: this port, and what this host's clients used."""

    port: int
    addresses: tuple[str, ...] = ()  # local addresses, in the order found
    networks: tuple[str, ...] = ()
    interfaces: tuple[str, ...] = ()


def values(
    port: int,
    addresses: Sequence[str],
    networks: Sequence[str] = (),
    interfaces: Sequence[str] = (),
) -> SnippetValues:
    """SnippetValues without duplicates, loopback or link-local addresses (a config
    that binds fe80:: needs a scope this text cannot know)."""

    def usable(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified)

    return SnippetValues(
        port,
        tuple(dict.fromkeys(a for a in addresses if usable(a))),
        tuple(dict.fromkeys(n for n in networks if n)),
        tuple(dict.fromkeys(i for i in interfaces if i)),
    )


def check(snippet: str) -> tuple[int, str] | None:
    """(line in the snippet, 0-based; what is wrong), or None when it renders."""
    inside: int | None = None
    for number, line in enumerate(snippet.splitlines()):
        if _FOR.match(line):
            if inside is not None:
                return number, "'{for address}' inside another one"
            inside = number
            continue
        if _END.match(line):
            if inside is None:
                return number, "'{end}' without '{for address}'"
            inside = None
            continue
        for name in _LOOKALIKE.findall(line):
            if not _PLACEHOLDER.fullmatch("{" + name + "}"):
                known = ", ".join("{" + n + "}" for n in (*_EACH, *_ONCE))
                return number, f"unknown placeholder {{{name}}} (known: {known})"
        repeated = {n for n in _PLACEHOLDER.findall(line) if n in _EACH}
        if len(repeated) > 1:
            return number, f"one line repeats for one placeholder, not {len(repeated)}"
    if inside is not None:
        return inside, "'{for address}' without '{end}'"
    return None


def render(snippet: str, filled: SnippetValues) -> str:
    """The snippet for this host (see the module's docstring)."""
    out: list[str] = []
    block: list[str] | None = None
    for line in snippet.splitlines():
        if _FOR.match(line):
            block = []
        elif _END.match(line) and block is not None:
            for address in filled.addresses or ("ADDRESS",):
                one = SnippetValues(filled.port, (address,), filled.networks, filled.interfaces)
                out += [done for body in block for done in _lines(body, one)]
            block = None
        elif block is not None:
            block.append(line)
        else:
            out += _lines(line, filled)
    return "\n".join(out) + ("\n" if snippet.endswith("\n") else "")


def _lines(line: str, filled: SnippetValues) -> list[str]:
    """One template line: none, one, or one per value of its repeating placeholder."""
    names = [n for n in _PLACEHOLDER.findall(line) if n in _EACH]
    once = _PLACEHOLDER.sub(lambda m: _once(m.group(1), filled), line)
    if not names:
        return [once]
    name = names[0]
    found = _EACH[name](filled)
    if not found:
        if filled.addresses and name in ("address4", "address6"):
            return []  # no client of that family: no line for it
        found = (name.upper(),)
    return [once.replace("{" + name + "}", value) for value in found]


def _once(name: str, filled: SnippetValues) -> str:
    if name == "port":
        return str(filled.port)
    if name == "addresses":
        return " ".join(filled.addresses) or "ADDRESS"
    if name == "networks":
        return ", ".join(filled.networks) or "NETWORK"
    return "{" + name + "}"  # a repeating one: _lines fills it


def filled_in(snippet: str, filled: SnippetValues) -> tuple[str | None, str]:
    """(a line saying what was filled in, or None when the snippet has nothing to fill;
    the snippet's text for this host). Both empty-ish for an empty snippet."""
    text = render(snippet, filled).rstrip()
    if not text.strip() or text == snippet.rstrip():
        return None, text
    return f"Filled in for port {filled.port} and the addresses clients use here:", text


def for_this_host(snippet: str, filled: SnippetValues) -> str:
    """The snippet as explain's advice prints it: on lines of its own, after the line
    that says what was filled in (nothing for an empty snippet)."""
    heading, text = filled_in(snippet, filled)
    if not text.strip():
        return ""
    return "".join(f"\n{line}" for line in (heading, text) if line)
