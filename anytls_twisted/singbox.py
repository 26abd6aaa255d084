"""Reading sing-box JSON configs, for both sides: the server's ``--config`` (an ``anytls``
inbound) and the client's (an ``anytls`` outbound).

Both want the same things from a config file: one error line naming the file and the field,
unknown fields refused with the closest known name, and the sing-box fields we accept but do
not implement named in one warning instead of silently dropped.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Collection, Dict, List

#: Fields of every sing-box block that change nothing here.
QUIET = {"type", "tag"}
#: Socket options sing-box's listen and dial fields share (docs: configuration/shared/listen,
#: shared/dial); neither the server nor the client implements them.
SOCKET_FIELDS = {
    "bind_interface",
    "routing_mark",
    "reuse_addr",
    "netns",
    "tcp_fast_open",
    "tcp_multi_path",
    "disable_tcp_keep_alive",
    "tcp_keep_alive",
    "tcp_keep_alive_interval",
    "udp_fragment",
    "detour",
    "domain_strategy",
}


class ConfigFileError(ValueError):
    """An unusable config file; the message names the file and the field."""


def fail(path: str, field: str, reason: str) -> ConfigFileError:
    if not field.isprintable():  # a key with a line break or control character: quote it
        field = repr(field)
    return ConfigFileError(f"{path}: {field}: {reason}")


def string(path: str, field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise fail(path, field, "must be a non-empty string")
    return value


def pick_anytls(path: str, document: Any, section: str = "inbounds") -> Dict[str, Any]:
    """The ``anytls`` block: the document itself, or the first of a whole sing-box config's
    ``section`` (the client reads ``outbounds`` the same way)."""
    if not isinstance(document, dict):
        raise fail(path, "(top level)", "must be a JSON object")
    if section in document:
        blocks = document[section]
        if not isinstance(blocks, list):
            raise fail(path, section, "must be a list")
        for block in blocks:
            if isinstance(block, dict) and block.get("type") == "anytls":
                return block
        raise fail(path, section, f"no {section[:-1]} of type anytls")
    if document.get("type", "anytls") != "anytls":
        raise fail(path, "type", f"is {document.get('type')!r}, not 'anytls'")
    return document


def check_fields(
    path: str, obj: dict, prefix: str, used: Collection[str], ignored: Collection[str]
) -> List[str]:
    """Raise for an unknown field (naming the closest known one); warn about ignored ones."""
    known = sorted(set(used) | set(ignored))
    for key in obj:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known: {', '.join(known)}"
            raise fail(path, prefix + key, f"unknown field; {hint}")
    skipped = [f"'{prefix}{key}'" for key in obj if key in ignored and key not in QUIET]
    if not skipped:
        return []
    fields = (
        "field " + skipped[0] + " is"
        if len(skipped) == 1
        else "fields " + ", ".join(skipped) + " are"
    )
    return [f"{path}: sing-box {fields} not supported by anytls-twisted and ignored"]


#: sing-box durations (Go ``time.ParseDuration``), for both sides' config files.
_DURATION = re.compile(r"(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|µs|μs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """A sing-box (Go ``time.ParseDuration``) duration such as ``"30s"``, ``"1m30s"`` or
    ``"500ms"`` -> seconds; ``"0"`` is allowed bare, signs are not (no negative intervals)."""
    if text == "0":
        return 0.0
    if not _DURATION.fullmatch(text):
        raise ValueError(f'{text!r} is not a duration such as "30s", "1m30s" or "500ms"')
    seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))
    if seconds > _MAX_DURATION:  # an infinite float too, from a few hundred digits
        raise ValueError(f"{text!r} is longer than a duration can be (about 292 years)")
    return seconds


#: Go's ``time.Duration`` is an int64 of nanoseconds; ``ParseDuration`` refuses longer ones.
_MAX_DURATION = (2**63 - 1) / 1e9
