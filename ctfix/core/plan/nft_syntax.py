"""libnftables JSON commands -> the same ruleset in `nft -f` syntax. Pure.

ctfix applies an nftables fix as one JSON batch; people read (and may paste into
`nft -f`) text. Rendering the text from the batch, instead of writing both by hand,
is what keeps them the same ruleset (tests/netns/test_fix_nft_text.py loads both and
compares what the kernel lists).

Know before changing: this covers the subset of the JSON schema (libnftables-json(5))
that ctfix writes: tables, sets (typed, concatenations, flags, timeout), base chains,
and rules made of matches on payload fields / concatenations / fib / ct / meta,
set update/add/delete, `ct zone set`, `meta mark set`, snat/dnat/masquerade,
accept/drop/counter and a comment. Anything else raises ValueError: an unknown
expression must never be dropped from what people are shown.
"""

from __future__ import annotations

from typing import Any

#: One libnftables JSON command, e.g. {"add": {"table": {...}}}. JSON is untyped data
#: here: the schema is libnftables', checked by libnftables when it is applied.
NftCommand = dict[str, Any]

#: Standard priority names (nft(8), "CHAIN PRIORITIES") for the ip/ip6/inet families;
#: dstnat and srcnat only where nft accepts them.
_PRIORITY_NAMES: dict[int, str] = {-300: "raw", -150: "mangle", 0: "filter", 50: "security"}
_NAT_PRIORITY = {("prerouting", -100): "dstnat", ("postrouting", 100): "srcnat"}
_OPS = {"==": "", "!=": "!= ", "<": "< ", ">": "> ", "<=": "<= ", ">=": ">= ", "in": ""}
_TABLE_KEYS = {"family", "table", "name", "handle"}


def render_batch(batch: tuple[NftCommand, ...] | list[NftCommand]) -> str:
    """The batch's tables as `nft -f` text: each table with its sets, then its chains
    and their rules, in batch order."""
    tables: dict[tuple[str, str], dict[str, list[str]]] = {}
    order: dict[tuple[str, str], list[str]] = {}
    rules: dict[tuple[str, str, str], list[str]] = {}
    for command in batch:
        verb, body = _one(command, "command")
        if verb not in ("add", "create"):
            raise ValueError(f"cannot render nft command {verb!r}")
        what, obj = _one(body, f"{verb} command")
        if what == "table":
            key = (str(obj["family"]), str(obj["name"]))
            tables.setdefault(key, {})
            order.setdefault(key, [])
            continue
        key = (str(obj["family"]), str(obj["table"]))
        if key not in tables:
            raise ValueError(f"{what} in table {key[0]} {key[1]}, which the batch does not add")
        if what == "set":
            tables[key][f"set {obj['name']}"] = _set_lines(obj)
            order[key].append(f"set {obj['name']}")
        elif what == "chain":
            tables[key][f"chain {obj['name']}"] = _chain_lines(obj)
            order[key].append(f"chain {obj['name']}")
            rules.setdefault((*key, str(obj["name"])), [])
        elif what == "rule":
            chain = (*key, str(obj["chain"]))
            if chain not in rules:
                raise ValueError(f"rule in chain {obj['chain']}, which the batch does not add")
            rules[chain].append(rule_text(obj))
        else:
            raise ValueError(f"cannot render nft object {what!r}")
    out: list[str] = []
    for (family, name), blocks in tables.items():
        out.append(f"table {family} {name} {{\n")
        for block in order[(family, name)]:
            kind, _, obj_name = block.partition(" ")
            out.append(f"\t{kind} {obj_name} {{\n")
            out.extend(f"\t\t{line}\n" for line in blocks[block])
            if kind == "chain":
                out.extend(f"\t\t{line}\n" for line in rules[(family, name, obj_name)])
            out.append("\t}\n")
        out.append("}\n")
    return "".join(out)


def _one(obj: Any, what: str) -> tuple[str, Any]:
    if not isinstance(obj, dict) or len(obj) != 1:
        raise ValueError(f"an nft {what} must be an object with one key: {obj!r}")
    [(key, value)] = obj.items()
    return str(key), value


def _set_lines(obj: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for key, value in obj.items():
        if key in _TABLE_KEYS:
            continue
        if key == "type":
            types = value if isinstance(value, list) else [value]
            lines.append(f"type {' . '.join(str(t) for t in types)}")
        elif key == "flags":
            flags = value if isinstance(value, list) else [value]
            lines.append(f"flags {','.join(str(f) for f in flags)}")
        elif key in ("timeout", "gc-interval"):
            lines.append(f"{key} {int(value)}s")
        elif key == "size":
            lines.append(f"size {int(value)}")
        else:
            raise ValueError(f"cannot render set property {key!r}")
    return lines


def _chain_lines(obj: dict[str, Any]) -> list[str]:
    unknown = set(obj) - _TABLE_KEYS - {"type", "hook", "prio", "policy"}
    if unknown:
        raise ValueError(f"cannot render chain properties {sorted(unknown)}")
    if "hook" not in obj:
        return []  # a regular chain: nothing but its rules
    hook, prio = str(obj["hook"]), int(obj["prio"])
    priority = _NAT_PRIORITY.get((hook, prio)) or _PRIORITY_NAMES.get(prio) or str(prio)
    line = f"type {obj['type']} hook {hook} priority {priority};"
    if "policy" in obj:
        line += f" policy {obj['policy']};"
    return [line]


def rule_text(rule: dict[str, Any]) -> str:
    """One rule's statements as nft prints them, with its comment."""
    words = [statement_text(stmt) for stmt in rule["expr"]]
    if "comment" in rule:
        words.append(f'comment "{rule["comment"]}"')
    return " ".join(words)


def statement_text(stmt: dict[str, Any]) -> str:
    kind, body = _one(stmt, "statement")
    if kind == "match":
        op = str(body.get("op", "=="))
        if op not in _OPS:
            raise ValueError(f"cannot render match operator {op!r}")
        return f"{expression_text(body['left'])} {_OPS[op]}{expression_text(body['right'])}"
    if kind == "set":
        return f"{body['op']} {body['set']} {{ {expression_text(body['elem'])} }}"
    if kind == "mangle":
        key = expression_text(body["key"])
        value = body["value"]
        if key == "meta mark" and isinstance(value, int):
            return f"{key} set 0x{value:x}"
        return f"{key} set {expression_text(value)}"
    if kind in ("snat", "dnat"):
        family = f" {body['family']}" if "family" in body else ""
        target = _nat_target(body)
        return f"{kind}{family} to {target}" if target else kind
    if kind == "masquerade":
        return "masquerade" + (f" to :{body['port']}" if body and "port" in body else "")
    if kind in ("accept", "drop", "return", "counter"):
        if body not in (None, {}) and kind != "counter":
            raise ValueError(f"cannot render {kind} with arguments")
        return kind
    raise ValueError(f"cannot render nft statement {kind!r}")


def _nat_target(body: dict[str, Any]) -> str:
    address = body.get("addr")
    port = body.get("port")
    if address is None:
        return f":{port}" if port is not None else ""
    text = expression_text(address)
    if port is None:
        return text
    if ":" in text:  # an IPv6 address with a port
        return f"[{text}]:{port}"
    return f"{text}:{port}"


def expression_text(expr: Any) -> str:
    if isinstance(expr, bool):
        raise ValueError(f"cannot render a boolean nft expression: {expr!r}")
    if isinstance(expr, (str, int)):
        return str(expr)
    kind, body = _one(expr, "expression")
    if kind == "payload":
        return f"{body['protocol']} {body['field']}"
    if kind == "concat":
        return " . ".join(expression_text(part) for part in body)
    if kind == "fib":
        flags = body.get("flags", [])
        flags = flags if isinstance(flags, list) else [flags]
        return f"fib {' . '.join(str(f) for f in flags)} {body['result']}"
    if kind in ("ct", "meta"):
        if set(body) - {"key"}:
            raise ValueError(f"cannot render {kind} with {sorted(set(body) - {'key'})}")
        return f"{kind} {body['key']}"
    if kind == "set":
        items = body if isinstance(body, list) else [body]
        return "{ " + ", ".join(expression_text(item) for item in items) + " }"
    if kind == "prefix":
        return f"{expression_text(body['addr'])}/{int(body['len'])}"
    raise ValueError(f"cannot render nft expression {kind!r}")
