"""Media type parsing (RFC 9110 8.3.1) tolerant of what real viewers send (unquoted parameters)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class MediaType:
    type: str  # lower-cased "type/subtype"
    params: dict[str, str] = field(default_factory=dict)  # keys lower-cased, values unquoted
    q: float = 1.0


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes."""
    parts: list[str] = []
    buf: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf))
    return parts


def parse_media_type(text: str) -> MediaType:
    pieces = _split(text, ";")
    mtype = pieces[0].strip().lower()
    params: dict[str, str] = {}
    q = 1.0
    for piece in pieces[1:]:
        if "=" not in piece:
            continue
        key, value = piece.split("=", 1)
        key = key.strip().lower()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if key == "q":
            try:
                q = float(value)
            except ValueError:
                q = 0.0
        else:
            params[key] = value
    return MediaType(mtype, params, q)


def parse_accept(header: str | None) -> list[MediaType]:
    """Accept header -> media types, highest q first (stable for equal q). Missing header: ``*/*``."""
    if not header or not header.strip():
        return [MediaType("*/*")]
    items = [parse_media_type(p) for p in _split(header, ",") if p.strip()]
    return sorted(items, key=lambda m: -m.q)
