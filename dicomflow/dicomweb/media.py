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


def request_accept(header: str | None, query_accept: str | None) -> list[MediaType]:
    """PS3.18 8.3.3.1: an ``accept`` query parameter (for browsers that cannot set headers) takes the
    place of the Accept header."""
    return parse_accept(query_accept if query_accept and query_accept.strip() else header)


def parse_accept(header: str | None) -> list[MediaType]:
    """Accept header -> media types, highest q first (stable for equal q). Missing header: ``*/*``."""
    if not header or not header.strip():
        return [MediaType("*/*")]
    items = [parse_media_type(p) for p in _split(header, ",") if p.strip()]
    return sorted(items, key=lambda m: -m.q)


# -- WADO-RS negotiation (PS3.18 8.7) ---------------------------------------------------------------------

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
ANY_TS = "*"
MULTIPART = "multipart/related"
DICOM = "application/dicom"
OCTET_STREAM = "application/octet-stream"

#: PS3.18 Table 8.7.3-4/-5 (pixel data media types): transfer syntax -> media type of a frame or bulk value.
TS_MEDIA_TYPE: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx", "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.110": "image/jxl", "1.2.840.10008.1.2.4.111": "image/jxl",
    "1.2.840.10008.1.2.4.112": "image/jxl",
    "1.2.840.10008.1.2.4.100": "video/mpeg2", "1.2.840.10008.1.2.4.101": "video/mpeg2",
    "1.2.840.10008.1.2.4.102": "video/mp4", "1.2.840.10008.1.2.4.103": "video/mp4",
    "1.2.840.10008.1.2.4.104": "video/mp4", "1.2.840.10008.1.2.4.105": "video/mp4",
    "1.2.840.10008.1.2.4.106": "video/mp4", "1.2.840.10008.1.2.4.107": "video/H265",
    "1.2.840.10008.1.2.4.108": "video/H265",
}
#: PS3.18 Table 8.7.3-4/-5: the transfer syntax a media type means when ``transfer-syntax`` is absent.
MEDIA_DEFAULT_TS: dict[str, str] = {
    OCTET_STREAM: EXPLICIT_VR_LE,
    DICOM: EXPLICIT_VR_LE,
    "image/jpeg": "1.2.840.10008.1.2.4.70",
    "image/jls": "1.2.840.10008.1.2.4.80",
    "image/jp2": "1.2.840.10008.1.2.4.90",
    "image/jpx": "1.2.840.10008.1.2.4.92",
    "image/jphc": "1.2.840.10008.1.2.4.201",
    "image/dicom-rle": "1.2.840.10008.1.2.5",
    "image/jxl": "1.2.840.10008.1.2.4.110",
    "video/mpeg2": "1.2.840.10008.1.2.4.100",
    "video/mp4": "1.2.840.10008.1.2.4.102",
    "video/H265": "1.2.840.10008.1.2.4.107",
}
#: Names older clients (and dicomweb-client) still send.
_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls", "video/h265": "video/H265"}
NATIVE_LE = frozenset({EXPLICIT_VR_LE, IMPLICIT_VR_LE})
_NATIVE = NATIVE_LE | {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"}  # + deflated, big endian


def canonical_type(mtype: str) -> str:
    return _ALIASES.get(mtype, mtype)


@dataclass(frozen=True, slots=True)
class Choice:
    """What one part of a WADO-RS response will be: its media type and transfer syntax."""

    media_type: str
    transfer_syntax: str

    def content_type(self) -> str:
        return f"{self.media_type}; transfer-syntax={self.transfer_syntax}"


def requested_parts(accept: list[MediaType], default_part: str) -> list[tuple[str, str]]:
    """(part media type, transfer syntax or "*") for each acceptable entry, in preference order.

    PS3.18 8.7.4/8.7.5: entries are ``multipart/related; type=...; transfer-syntax=...``; a missing type
    means the resource's default; a missing transfer-syntax means the media type's default (8.7.3.5.2);
    ``*/*`` and ``multipart/*`` mean the defaults. A bare single-part type is taken as a multipart request
    for that part type (lenient: some viewers send it).
    """
    wanted: list[tuple[str, str]] = []
    for m in accept:
        if m.q <= 0:
            continue
        if m.type in (MULTIPART, "multipart/*"):
            part = canonical_type(m.params.get("type", default_part).strip().lower())
        elif m.type == "*/*":
            part = default_part
        else:
            part = canonical_type(m.type)
        ts = m.params.get("transfer-syntax", "").strip()
        if part in ("*/*", "*"):
            part = default_part
        wanted.append((part, ts or MEDIA_DEFAULT_TS.get(part, EXPLICIT_VR_LE)))
    return wanted


def negotiate_dicom(accept: list[MediaType], stored_ts: str, possible: frozenset[str]) -> Choice | None:
    """Instance/series/study retrieve (PS3.18 10.4.1.1.1): the syntax to send one instance in, or None.

    ``possible`` is every syntax the instance can be sent in (as stored or transcoded).
    """
    for part, ts in requested_parts(accept, DICOM):
        if part != DICOM:
            continue
        if ts == ANY_TS:
            return Choice(DICOM, stored_ts)
        if ts in possible:
            return Choice(DICOM, ts)
    return None


def wants_dicom(accept: list[MediaType]) -> bool:
    return any(part == DICOM for part, _ts in requested_parts(accept, DICOM))


def negotiate_pixels(accept: list[MediaType], stored_ts: str, possible: frozenset[str]) -> Choice | None:
    """Frames and pixel bulk data (PS3.18 10.4.1.1.4, 8.7.3.3): the media type and syntax of each frame.

    Native data goes out as ``application/octet-stream`` (Explicit VR Little Endian byte order);
    encapsulated data as its compressed media type (Table 8.7.3-4). ``transfer-syntax=*`` takes the
    data as stored.
    """
    for part, ts in requested_parts(accept, OCTET_STREAM):
        if ts == ANY_TS:
            if part == OCTET_STREAM or part in ("image/*", "video/*") or TS_MEDIA_TYPE.get(stored_ts) == part:
                media = TS_MEDIA_TYPE.get(stored_ts, OCTET_STREAM)
                # native data goes out in Explicit VR Little Endian byte order; anything else as stored
                return Choice(media, EXPLICIT_VR_LE if stored_ts in _NATIVE else stored_ts)
            continue
        if part == OCTET_STREAM:
            if ts in NATIVE_LE and (stored_ts in NATIVE_LE or ts in possible):
                return Choice(OCTET_STREAM, ts)
            continue
        if TS_MEDIA_TYPE.get(ts) != part:
            continue
        if ts == stored_ts or ts in possible:
            return Choice(part, ts)
    return None
