"""Accept negotiation for WADO-RS (PS3.18 8.7): what real clients send, and what must be refused."""

from __future__ import annotations

import pytest

from dicomflow.dicomweb.media import (
    Choice,
    negotiate_dicom,
    negotiate_pixels,
    parse_accept,
    parse_media_type,
    wants_dicom,
)
from dicomflow.imaging.transcode import possible_targets

ELE, ILE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
JLS, J2K, RLE, JPEG_BASE = "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5", \
    "1.2.840.10008.1.2.4.50"
MPEG4 = "1.2.840.10008.1.2.4.102"


def test_parse_media_type_unquoted_and_quoted_parameters() -> None:
    m = parse_media_type('multipart/related; type=application/octet-stream; transfer-syntax=*')
    assert m.type == "multipart/related"
    assert m.params == {"type": "application/octet-stream", "transfer-syntax": "*"}
    m = parse_media_type('Multipart/Related; TYPE="application/dicom"; q=0.4')
    assert m.params["type"] == "application/dicom" and m.q == 0.4


def test_accept_sorted_by_q_stable_and_missing_means_any() -> None:
    accept = parse_accept("image/png;q=0.5, image/jpeg, image/gif;q=0.5")
    assert [m.type for m in accept] == ["image/jpeg", "image/png", "image/gif"]
    assert [m.type for m in parse_accept(None)] == ["*/*"]
    assert [m.type for m in parse_accept("  ")] == ["*/*"]


@pytest.mark.parametrize(("accept", "stored", "expected"), [
    (None, ELE, ELE),  # default media type and transfer syntax (8.7.3.5.2)
    ("*/*", ILE, ELE),  # default is Explicit VR LE even when stored implicit: transcode
    ('multipart/related; type="application/dicom"', JLS, ELE),
    ('multipart/related; type="application/dicom"; transfer-syntax=*', JLS, JLS),
    ("multipart/related; type=application/dicom; transfer-syntax=1.2.840.10008.1.2.4.90", ELE, J2K),
    ("multipart/related", ELE, ELE),  # the type defaults to application/dicom
    ("application/dicom", JLS, ELE),  # lenient: bare part type
    (f'multipart/related; type="application/dicom"; transfer-syntax={JLS}; q=0.2, '
     'multipart/related; type="application/dicom"; transfer-syntax=*', J2K, J2K),
])
def test_negotiate_dicom(accept: str | None, stored: str, expected: str) -> None:
    choice = negotiate_dicom(parse_accept(accept), stored, possible_targets(stored))
    assert choice == Choice("application/dicom", expected)


@pytest.mark.parametrize("accept", [
    "application/dicom+json", "image/jpeg", 'multipart/related; type="application/octet-stream"',
    'multipart/related; type="application/dicom"; q=0',
])
def test_wrong_media_types_are_not_acceptable(accept: str) -> None:
    assert not wants_dicom(parse_accept(accept))


def test_video_is_only_sent_as_stored() -> None:
    accept = parse_accept('multipart/related; type="application/dicom"')
    assert negotiate_dicom(accept, MPEG4, possible_targets(MPEG4)) is None
    star = parse_accept('multipart/related; type="application/dicom"; transfer-syntax=*')
    assert negotiate_dicom(star, MPEG4, possible_targets(MPEG4)) == Choice("application/dicom", MPEG4)


@pytest.mark.parametrize(("accept", "stored", "expected"), [
    ("multipart/related; type=application/octet-stream; transfer-syntax=*", ELE,
     Choice("application/octet-stream", ELE)),  # OHIF
    ("multipart/related; type=application/octet-stream; transfer-syntax=*", JLS, Choice("image/jls", JLS)),
    ("multipart/related; type=application/octet-stream; transfer-syntax=*", RLE, Choice("image/dicom-rle", RLE)),
    ("multipart/related; type=application/octet-stream; transfer-syntax=*", "1.2.840.10008.1.2.2",
     Choice("application/octet-stream", ELE)),  # big endian goes out little endian
    ("multipart/related; type=application/octet-stream; transfer-syntax=*", "1.2.3.4.5",
     Choice("application/octet-stream", "1.2.3.4.5")),  # unknown encapsulated syntax: as stored
    (None, JLS, Choice("application/octet-stream", ELE)),  # decode to the default
    ('multipart/related; type="image/jls"', ELE, Choice("image/jls", JLS)),  # default TS of image/jls
    ('multipart/related; type="image/x-jls"', JLS, Choice("image/jls", JLS)),  # older name
    ('multipart/related; type="image/jp2"; transfer-syntax=*', J2K, Choice("image/jp2", J2K)),
    ('multipart/related; type="image/jpeg"', ELE, Choice("image/jpeg", "1.2.840.10008.1.2.4.70")),
    ('multipart/related; type="image/x-dicom-rle"', ELE, Choice("image/dicom-rle", RLE)),
])
def test_negotiate_pixels(accept: str | None, stored: str, expected: Choice) -> None:
    assert negotiate_pixels(parse_accept(accept), stored, possible_targets(stored)) == expected


@pytest.mark.parametrize(("accept", "stored"), [
    ('multipart/related; type="image/jp2"; transfer-syntax=1.2.840.10008.1.2.4.50', ELE),  # mismatched pair
    ('multipart/related; type="image/jp2"; transfer-syntax=*', JLS),  # as stored, but stored is not jp2
    ("image/png", ELE),
    ('multipart/related; type="application/octet-stream"', MPEG4),
])
def test_negotiate_pixels_refuses(accept: str, stored: str) -> None:
    assert negotiate_pixels(parse_accept(accept), stored, possible_targets(stored)) is None


def test_content_type_of_a_choice() -> None:
    assert Choice("image/jls", JLS).content_type() == f"image/jls; transfer-syntax={JLS}"
