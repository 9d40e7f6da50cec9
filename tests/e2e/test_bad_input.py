"""Bad input gets a clear error in the protocol's terms, nothing is half-stored, and the server keeps serving.

Malformed HTTP is sent over raw sockets (no client would produce it); the rest with requests/aiohttp.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.conftest import LiveServer, make_settings, running_server
from tests.factory import make_dataset, make_instance, multipart, store_state, to_bytes

pytestmark = pytest.mark.e2e

DICOM_RELATED = 'multipart/related; type="application/dicom"; boundary=b0undary'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One server for the whole module: every test must leave it able to store (checked after each)."""
    settings = make_settings(tmp_path_factory.mktemp("bad"), limits={"max_instance_size": 200_000},
                             routing={"enabled": False})
    with running_server(settings) as live:
        yield live


@pytest.fixture(autouse=True)
def still_serving(server: LiveServer) -> Iterator[None]:
    """After every bad request a good STOW succeeds, and the store holds nothing half-stored."""
    yield
    body, ctype = multipart([make_instance()])
    resp = requests.post(f"{server.dicomweb}/studies", data=body, headers={"Content-Type": ctype}, timeout=30)
    assert resp.status_code == 200
    state = store_state(server.settings)
    assert sorted(i[4] for i in state.instances) == state.blobs
    assert len(state.events("instance.stored")) == len(state.instances)
    assert state.spool == []


def raw(server: LiveServer, data: bytes) -> tuple[int, bytes]:
    """Send bytes, read the answer until the server closes or stops sending; (status, body)."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(data)
        out = b""
        sock.settimeout(2)
        try:
            while chunk := sock.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out:
                    head, _, rest = out.partition(b"\r\n\r\n")
                    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), None)
                    if length is not None and len(rest) >= length:
                        break
        except TimeoutError:
            pass
    status_line = out.split(b"\r\n", 1)[0]
    return int(status_line.split(b" ")[1]), out.partition(b"\r\n\r\n")[2]


def post(server: LiveServer, body: bytes, ctype: str | None, path: str = "/dicomweb/studies") -> requests.Response:
    headers = {"Content-Type": ctype} if ctype is not None else {}
    return requests.post(f"{server.url}{path}", data=body, headers=headers, timeout=30)


def reasons(resp: requests.Response) -> list[int]:
    return [f["00081197"]["Value"][0] for f in resp.json().get("00081198", {}).get("Value", [])]


def problem(resp: requests.Response) -> dict[str, Any]:
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    body: dict[str, Any] = resp.json()
    assert body["status"] == resp.status_code and body["detail"]
    return body


# -- instances that cannot be stored: FailedSOPSequence with the PS3.4 B.2.3 reason -------------------

def test_truncated_part(server: LiveServer) -> None:
    resp = post(server, *multipart([make_instance()[:-10]]))
    assert resp.status_code == 409 and reasons(resp) == [0xC000]
    assert "truncated" in resp.headers["Warning"]


def test_non_dicom_parts(server: LiveServer) -> None:
    resp = post(server, *multipart([b"%PDF-1.4 not dicom", b"", b"\0" * 132]))
    assert resp.status_code == 409 and reasons(resp) == [0xC000, 0xC000, 0xC000]


@pytest.mark.parametrize("keyword", ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
def test_missing_uids(server: LiveServer, keyword: str) -> None:
    ds = make_dataset()
    delattr(ds, keyword)
    resp = post(server, *multipart([to_bytes(ds)]))
    assert resp.status_code == 409 and reasons(resp) == [0xA900]
    name = {"SOPClassUID": "SOP Class UID", "SOPInstanceUID": "SOP Instance UID",
            "StudyInstanceUID": "Study Instance UID", "SeriesInstanceUID": "Series Instance UID"}[keyword]
    assert f"{name} (Type 1) is missing" in resp.headers["Warning"]


def test_invalid_uid_in_the_dataset(server: LiveServer) -> None:
    resp = post(server, *multipart([to_bytes(make_dataset(sop_uid="1.2.3.abc"))]))
    assert resp.status_code == 409 and reasons(resp) == [0xA900]


def test_study_uid_mismatch(server: LiveServer) -> None:
    ds = make_dataset()
    resp = post(server, *multipart([to_bytes(ds)]), path="/dicomweb/studies/1.2.3.999")
    assert resp.status_code == 409 and reasons(resp) == [0xA900]
    assert resp.json()["00081198"]["Value"][0]["00081155"]["Value"] == [ds.SOPInstanceUID]


def test_series_already_in_another_study(server: LiveServer) -> None:
    first = make_dataset()
    assert post(server, *multipart([to_bytes(first)])).status_code == 200
    moved = make_dataset(series_uid=first.SeriesInstanceUID)  # same series, another study
    resp = post(server, *multipart([to_bytes(moved)]))
    assert resp.status_code == 409 and reasons(resp) == [0xA900]


def test_instance_larger_than_the_limit(server: LiveServer) -> None:
    big = make_instance(rows=400, columns=400)  # 320 kB > max_instance_size 200 kB
    resp = post(server, *multipart([big]))
    assert resp.status_code == 413 and reasons(resp) == [0xA700]
    resp = post(server, *multipart([big, make_instance()]))
    assert resp.status_code == 202 and reasons(resp) == [0xA700]


# -- request-level errors: 415 / 400 / 404 with application/problem+json -------------------------------

@pytest.mark.parametrize("ctype", [None, "application/dicom", "application/json", "multipart/form-data; boundary=b",
                                   'multipart/related; type="application/dicom+json"; boundary=b0undary',
                                   'multipart/related; type="image/jpeg"; boundary=b0undary'])
def test_wrong_or_missing_content_type_is_415(server: LiveServer, ctype: str | None) -> None:
    resp = post(server, multipart([make_instance()], boundary="b0undary")[0], ctype)
    assert resp.status_code == 415
    assert "application/dicom" in problem(resp)["detail"]


def test_multipart_without_boundary_parameter_is_400(server: LiveServer) -> None:
    resp = post(server, multipart([make_instance()])[0], 'multipart/related; type="application/dicom"')
    assert resp.status_code == 400 and "boundary" in problem(resp)["detail"]


@pytest.mark.parametrize("body", [
    b"no boundary anywhere in this body",
    b"--other\r\nContent-Type: application/dicom\r\n\r\nxx\r\n--other--\r\n",
    b"--b0undary--\r\n",
    b"",
])
def test_body_without_parts_is_400(server: LiveServer, body: bytes) -> None:
    resp = post(server, body, DICOM_RELATED)
    assert resp.status_code == 400
    problem(resp)


def test_missing_closing_boundary_is_400(server: LiveServer) -> None:
    data = make_instance()
    body = b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + data  # body ends inside the part
    before = store_state(server.settings).instances
    resp = post(server, body, DICOM_RELATED)
    assert resp.status_code == 400
    assert store_state(server.settings).instances == before


def test_garbage_part_headers_then_good_part(server: LiveServer) -> None:
    good = make_instance()
    body = (b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + good
            + b"\r\n--b0undary\r\nthis is not a header line\r\n\r\nxx\r\n--b0undary--\r\n")
    resp = post(server, body, DICOM_RELATED)
    assert resp.status_code in (200, 202)
    assert len(resp.json()["00081199"]["Value"]) == 1


@pytest.mark.parametrize("path", [
    "/dicomweb/studies/abc", "/dicomweb/studies/1.2.03", "/dicomweb/studies/1..2", "/dicomweb/studies/1.2.",
    "/dicomweb/studies/" + "1." * 40 + "1",  # longer than 64 characters
])
def test_invalid_uid_in_path_is_400(server: LiveServer, path: str) -> None:
    resp = post(server, *multipart([make_instance()]), path=path)
    assert resp.status_code == 400 and "UID" in problem(resp)["detail"]
    assert requests.delete(f"{server.url}{path}", timeout=30).status_code == 400


@pytest.mark.parametrize("path", ["/tenants/nobody/dicomweb/studies", "/tenants/NOT_VALID/dicomweb/studies"])
def test_unknown_tenant_is_404(server: LiveServer, path: str) -> None:
    resp = post(server, *multipart([make_instance()]), path=path)
    assert resp.status_code == 404
    problem(resp)
    assert requests.delete(f"{server.url}{path}/1.2.3", timeout=30).status_code == 404


# -- malformed HTTP on a raw socket -------------------------------------------------------------------

def test_header_field_larger_than_max_field_size(server: LiveServer) -> None:
    """aiohttp refuses it with 400 and a message naming the limit (RFC 6585 4 allows 431 or 400)."""
    limit = server.settings.http.max_field_size
    status, body = raw(server, b"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (limit + 10)
                       + b"\r\nContent-Length: 0\r\n\r\n")
    assert status in (400, 431) and f"more than {limit} bytes".encode() in body


def test_request_line_longer_than_max_line_size(server: LiveServer) -> None:
    limit = server.settings.http.max_line_size
    status, body = raw(server, b"GET /dicomweb/studies?" + b"a" * (limit + 10) + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status in (400, 414) and f"more than {limit} bytes".encode() in body


@pytest.mark.parametrize("request_bytes", [
    b"garbage\r\n\r\n",
    b"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: " + DICOM_RELATED.encode() + b"\r\n\r\nzz\r\nnot hex\r\n",
])
def test_malformed_http_is_400(server: LiveServer, request_bytes: bytes) -> None:
    status, _ = raw(server, request_bytes)
    assert status == 400


def test_content_length_larger_than_the_body(server: LiveServer) -> None:
    body, ctype = multipart([make_instance()])
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(f"POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body) + 1000}\r\n\r\n".encode() + body)
        sock.shutdown(socket.SHUT_WR)  # the promised bytes never come
        sock.settimeout(5)
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass
    # whatever was answered, nothing half-stored (checked by still_serving)
