"""The filesystem blob store: blob paths stay under the root, and new folders are made durable."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dicomflow.errors import NotFoundError
from dicomflow.offload import Offloader
from dicomflow.storage import filesystem
from dicomflow.storage.filesystem import FilesystemBlobStore


@pytest.fixture()
def store(tmp_path: Path) -> FilesystemBlobStore:
    return FilesystemBlobStore(tmp_path / "blobs", Offloader(1))


def _spooled(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.fixture()
def synced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The folders fsynced, in order."""
    calls: list[Path] = []
    real = filesystem._fsync_dir

    def recording(path: Path) -> None:
        calls.append(Path(path))
        real(path)

    monkeypatch.setattr(filesystem, "_fsync_dir", recording)
    return calls


def test_first_blob_in_new_folders_fsyncs_every_parent_that_got_an_entry(
        store: FilesystemBlobStore, tmp_path: Path, synced: list[Path]) -> None:
    root = store.root
    store._put("acme/ab/cd/abcd01", _spooled(tmp_path, "a", b"one"))
    assert (root / "acme/ab/cd/abcd01").read_bytes() == b"one"
    # each new folder's entry in its parent, then the blob's entry in its folder (rename(2) is not durable
    # until the folder holding the new name is)
    assert synced == [root, root / "acme", root / "acme/ab", root / "acme/ab/cd"]
    synced.clear()
    store._put("acme/ab/cd/abcd02", _spooled(tmp_path, "b", b"two"))
    assert synced == [root / "acme/ab/cd"]  # known folders: only the blob's own entry


def test_a_folder_removed_under_the_store_is_made_again(store: FilesystemBlobStore, tmp_path: Path) -> None:
    store._put("acme/ab/cd/abcd01", _spooled(tmp_path, "a", b"one"))
    shutil.rmtree(store.root / "acme")
    store._put("acme/ab/cd/abcd02", _spooled(tmp_path, "b", b"two"))
    assert (store.root / "acme/ab/cd/abcd02").read_bytes() == b"two"


@pytest.mark.parametrize("key", ["../outside", "acme/../../outside", "/etc/passwd"])
def test_keys_that_leave_the_root_are_refused(store: FilesystemBlobStore, key: str) -> None:
    with pytest.raises(NotFoundError):
        store._path(key)


def test_missing_source_is_an_error_not_a_retry_loop(store: FilesystemBlobStore, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        store._put("acme/ab/cd/abcd03", tmp_path / "gone")


def test_existing_folders_unknown_to_this_process_get_their_parent_fsynced_once(
        tmp_path: Path, synced: list[Path]) -> None:
    """A folder another thread or an earlier run created may not be durable yet: fsync its parent once."""
    (tmp_path / "blobs/acme/ab/cd").mkdir(parents=True)
    store = FilesystemBlobStore(tmp_path / "blobs", Offloader(1))
    root = store.root
    store._put("acme/ab/cd/abcd01", _spooled(tmp_path, "a", b"one"))
    assert synced == [root, root / "acme", root / "acme/ab", root / "acme/ab/cd"]
    synced.clear()
    store._put("acme/ab/ef/abef01", _spooled(tmp_path, "b", b"two"))
    assert synced == [root / "acme/ab", root / "acme/ab/ef"]  # only the new folder's entry, then the blob's
