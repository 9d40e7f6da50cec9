"""The documentation stays in step with the code: README.md, docs/*.md and config/settings.example.yaml.

What is checked, and why it is cheap to keep true:

- the generated tables of docs/conformance.md equal what scripts/conformance_tables.py builds from the code;
- the HTTP resources listed in docs/conformance.md are exactly the routes the application mounts;
- every UID named in docs/conformance.md is one the code uses;
- every ``section.key`` setting named in the docs is a Settings field, and the example settings file
  loads (Settings forbids unknown keys) and mentions every field;
- every ``dicomflow ...`` command and ``make`` target shown in code in the docs exists;
- every relative link in the docs points at a file that exists.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType
from typing import Any, get_args, get_origin

import pytest
from pydantic import BaseModel

from dicomflow.__main__ import main as cli_main
from dicomflow.app import create_app
from dicomflow.dicomweb import media
from dicomflow.dimse import commitment, sop_classes
from dicomflow.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
CONFORMANCE = ROOT / "docs" / "conformance.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLE = ROOT / "config" / "settings.example.yaml"
DICOMWEB_ROOTS = ("/dicomweb", "/tenants/{tenant}/dicomweb")
ADMIN_ROOTS = ("/admin", "/tenants/{tenant}/admin")


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("conformance_tables", ROOT / "scripts" / "conformance_tables.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _code(text: str) -> list[str]:
    """Fenced code blocks and inline code spans of a Markdown text."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    inline = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE))
    return fenced + inline


def _block(text: str, name: str) -> list[str]:
    found = re.search(rf"<!-- routes:{name} -->\n```\n(.*?)```\n<!-- /routes:{name} -->", text, re.DOTALL)
    assert found is not None, f"routes:{name} block missing in docs/conformance.md"
    return [line for line in found.group(1).splitlines() if line.strip()]


def test_generated_tables_are_current() -> None:
    text = CONFORMANCE.read_text(encoding="utf-8")
    assert _script().regenerate(text) == text, "run: .venv/bin/python scripts/conformance_tables.py"


def test_documented_resources_are_exactly_the_routed_ones(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path))
    routed = {(r.method, r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD" and r.resource is not None}
    text = CONFORMANCE.read_text(encoding="utf-8")
    documented: set[tuple[str, str]] = set()
    for line in _block(text, "dicomweb"):
        method, path = line.split()[:2]
        documented |= {(method, root + path) for root in DICOMWEB_ROOTS}
    for line in _block(text, "other"):
        method, path = line.split()[:2]
        roots = ADMIN_ROOTS if path.startswith("{admin}") else ("",)
        documented |= {(method, path.replace("{admin}", root)) for root in roots}
    assert sorted(routed - documented) == [], "routed but not in docs/conformance.md"
    assert sorted(documented - routed) == [], "in docs/conformance.md but not routed"


def test_uids_in_the_conformance_statement_are_used_by_the_code() -> None:
    known = set(sop_classes.storage_sop_classes()) | set(sop_classes.STORAGE_TRANSFER_SYNTAXES)
    known |= {str(u) for u in (*sop_classes.QR_FIND_SOP_CLASSES, *sop_classes.QR_MOVE_SOP_CLASSES,
                               *sop_classes.QR_GET_SOP_CLASSES, sop_classes.sc.Verification,
                               sop_classes.sc.StorageCommitmentPushModel)}
    known |= set(media.TS_MEDIA_TYPE) | {commitment.STORAGE_COMMITMENT_INSTANCE}
    import pynetdicom

    known.add(pynetdicom.PYNETDICOM_IMPLEMENTATION_UID)
    text = CONFORMANCE.read_text(encoding="utf-8")
    named = set(re.findall(r"`(1\.2\.[0-9.]+[0-9])`", text))
    assert named, "no UIDs found: the pattern no longer matches the document"
    assert sorted(named - known) == []
    assert sop_classes.sc.CTImageStorage in named


def _models(annotation: Any) -> list[type[BaseModel]]:
    return [a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]


def _field(model: type[BaseModel], parts: list[str]) -> bool:
    """Whether a dotted settings path names a field; after a dict field comes any key (``tenants.<t>.x``)."""
    current: type[BaseModel] = model
    i = 0
    while i < len(parts):
        info = current.model_fields.get(parts[i])
        if info is None:
            return False
        annotation = info.annotation
        if get_origin(annotation) is dict:
            i += 1  # the dict key
            annotation = get_args(annotation)[1]
        models = _models(annotation)
        if not models:
            return i >= len(parts) - 1  # a leaf: nothing may follow it
        current = models[0]
        i += 1
    return True


def test_settings_named_in_docs_exist() -> None:
    pattern = re.compile(r"^((?:limits|http|dimse|auth|audit|routing|s3|tenants)(?:\.[a-z_<>]+)+)$")
    named: set[str] = set()
    for doc in DOCS:
        for span in _code(doc.read_text(encoding="utf-8")):
            match = pattern.match(span.strip())
            if match and not re.search(r"\.(py|md|ya?ml|json|sh)$", span.strip()):  # file names (auth.py)
                named.add(match.group(1))
    assert "limits.max_instance_size" in named
    unknown = sorted(n for n in named if not _field(Settings, n.split(".")))
    assert unknown == []


def test_settings_example_loads_and_mentions_every_field() -> None:
    settings = load_settings(EXAMPLE)  # Settings forbids unknown keys: a stale key fails here
    assert settings.http.port == 8080
    text = EXAMPLE.read_text(encoding="utf-8")
    missing: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            # set, or shown in a comment or a flow mapping ({host: ..., port: ...})
            if not re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}:", text):
                missing.append(prefix + name)
            nested = _models(info.annotation)
            if nested:
                walk(nested[0], f"{prefix}{name}.")

    walk(Settings, "")
    # destinations are a discriminated union of their own, documented by example entries
    assert [m for m in missing if not m.startswith("routing.destinations")] == []


def _choices(argv: list[str], capsys: pytest.CaptureFixture[str]) -> set[str]:
    with pytest.raises(SystemExit):
        cli_main([*argv, "--help"])
    usage = capsys.readouterr().out
    found = re.search(r"\{([a-z,-]+)\}", usage)
    return set(found.group(1).split(",")) if found else set()


def test_cli_commands_in_docs_exist(capsys: pytest.CaptureFixture[str]) -> None:
    commands: set[tuple[str, ...]] = set()
    for doc in DOCS:
        for code in _code(doc.read_text(encoding="utf-8")):
            for words in re.findall(r"(?:^|[\s/(])dicomflow((?: [a-z][a-z-]*){1,2})", code):
                commands.add(tuple(words.split()))
    assert ("serve",) in {c[:1] for c in commands}
    top = _choices([], capsys)
    problems: list[str] = []
    for command in sorted(commands):
        if command[0] not in top:
            problems.append(" ".join(command))
            continue
        sub = _choices([command[0]], capsys)
        if sub and len(command) > 1 and command[1] not in sub:
            problems.append(" ".join(command))
    assert problems == []


def test_make_targets_in_docs_exist() -> None:
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.MULTILINE))
    named = {t for doc in DOCS for code in _code(doc.read_text(encoding="utf-8"))
             for t in re.findall(r"(?:^|\s)make ([a-z][a-z-]*)", code)}
    assert {"serve", "test"} <= named
    assert sorted(named - targets) == []


def test_relative_links_resolve() -> None:
    broken: list[str] = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            if not (doc.parent / target.split("#")[0]).exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert broken == []
