"""Regenerate the tables of docs/conformance.md that are read straight from the code.

Each table sits between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` markers and is
rebuilt from the module that defines it (presentation contexts from dicomflow/dimse/sop_classes.py,
WADO-RS media types from dicomflow/dicomweb/media.py, transcoding from dicomflow/imaging/transcode.py).

    .venv/bin/python scripts/conformance_tables.py           # rewrite docs/conformance.md in place
    .venv/bin/python scripts/conformance_tables.py --check   # exit 1 when a table is out of date

tests/unit/test_docs.py runs the check.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from pydicom.uid import UID
from pynetdicom import sop_class as _sop_class

from dicomflow.dicomweb import media
from dicomflow.dimse import sop_classes
from dicomflow.imaging import transcode

DOC = Path(__file__).resolve().parent.parent / "docs" / "conformance.md"
_KEYWORDS: dict[str, str] = {str(v): k for k, v in getattr(_sop_class, "_STORAGE_CLASSES", {}).items()}


def uid_name(uid: str) -> str:
    """pydicom's name of a UID; pynetdicom's keyword for storage classes pydicom does not name yet."""
    name = UID(uid).name
    if name != uid:
        return name
    keyword = _KEYWORDS.get(uid)
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", keyword) if keyword else uid


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _syntaxes(uids: Iterable[str]) -> str:
    return "<br>".join(f"{uid_name(u)} `{u}`" for u in uids)


def dimse_services() -> str:
    """Non-storage presentation contexts (verification, commitment, query/retrieve)."""
    ts = _syntaxes(sop_classes.BASIC_TRANSFER_SYNTAXES)
    sc = sop_classes.sc
    rows = [
        (uid_name(sc.Verification), f"`{sc.Verification}`", "SCP", ts),
        (uid_name(sc.StorageCommitmentPushModel), f"`{sc.StorageCommitmentPushModel}`", "SCP", ts),
    ]
    for sop in (*sop_classes.QR_FIND_SOP_CLASSES, *sop_classes.QR_MOVE_SOP_CLASSES, *sop_classes.QR_GET_SOP_CLASSES):
        rows.append((uid_name(sop), f"`{sop}`", "SCP", ts))
    return _table(("SOP Class", "UID", "role", "transfer syntaxes"), rows)


def storage_transfer_syntaxes() -> str:
    return _table(("transfer syntax", "UID"),
                  ((uid_name(u), f"`{u}`") for u in sop_classes.STORAGE_TRANSFER_SYNTAXES))


def storage_sop_classes() -> str:
    domains: dict[str, list[str]] = {}
    for domain, uids in sop_classes.REQUIRED_STORAGE_SOP_CLASSES.items():
        for uid in uids:
            domains.setdefault(str(uid), []).append(domain)
    rows = ((uid_name(u), f"`{u}`", ", ".join(domains.get(u, ()))) for u in sop_classes.storage_sop_classes())
    return _table(("Storage SOP Class (SCP, and SCP/SCU role for C-GET)", "UID", "promised for"), rows)


def wado_media_types() -> str:
    rows = ((f"`{mt}`", f"{uid_name(ts)} `{ts}`") for ts, mt in media.TS_MEDIA_TYPE.items())
    return _table(("media type of a frame / pixel bulk data", "transfer syntax"), rows)


def transcoding() -> str:
    def names(uids: Iterable[str]) -> str:
        return "<br>".join(f"{uid_name(u)} `{u}`" for u in sorted(uids, key=lambda u: [int(p) for p in u.split(".")]))

    return _table(("", "transfer syntaxes"), (
        ("decoded from (besides native)", names(transcode.DECODABLE)),
        ("native targets written", names(transcode.NATIVE_TARGETS)),
        ("compressed targets written", names(transcode.ENCODABLE)),
        ("lossy: to a DIMSE peer only when it accepts no lossless syntax we can produce; "
         "over WADO-RS only when asked for", names(transcode.LOSSY)),
    ))


TABLES: dict[str, Callable[[], str]] = {
    "dimse-services": dimse_services,
    "storage-transfer-syntaxes": storage_transfer_syntaxes,
    "storage-sop-classes": storage_sop_classes,
    "wado-media-types": wado_media_types,
    "transcoding": transcoding,
}


def regenerate(text: str) -> str:
    """``text`` with every generated table rebuilt; a missing marker pair is an error."""
    for name, build in TABLES.items():
        pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- /generated:{name} -->)", re.DOTALL)
        found = pattern.search(text)
        if found is None:
            raise ValueError(f"markers for generated table {name!r} not found")
        text = text[:found.end(1)] + build() + "\n" + text[found.start(2):]
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a table is out of date")
    parser.add_argument("path", nargs="?", type=Path, default=DOC)
    args = parser.parse_args(argv)
    text = args.path.read_text(encoding="utf-8")
    new = regenerate(text)
    if args.check:
        if new != text:
            print(f"{args.path}: generated tables are out of date; run scripts/conformance_tables.py")
            return 1
        return 0
    if new != text:
        args.path.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
