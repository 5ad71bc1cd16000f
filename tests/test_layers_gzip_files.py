"""gzip layer files on disk, as the store holds them: decompressed by ISA-L's igzip when Debian's
isal is installed, by zlib otherwise, and judged the same way either way.

A user unpacks a stored image: good layers (one gzip member or several) unpack; a layer cut short,
with a damaged checksum, with bytes after the stream, or empty is refused with a LayerError, and a
layer whose content doesn't match its DiffID with an IntegrityError.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest

from layer_builder import F, tar_bytes
from ocibox import layers
from ocibox.errors import IntegrityError, LayerError
from ocibox.layers import apply_layers

RAW = tar_bytes([F("etc/motd", "hello\n"), F("usr/lib/big", "x" * 300_000)])
DIFF_ID = "sha256:" + hashlib.sha256(RAW).hexdigest()
ONE = gzip.compress(RAW)


@pytest.fixture(autouse=True, params=["igzip", "zlib"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "igzip" and layers._igzip_path() is None:
        pytest.skip("igzip (Debian's isal) is not installed")
    if request.param == "zlib":
        monkeypatch.setattr(layers, "_igzip_path", lambda: None)
    return request.param


def damaged_crc(blob: bytes) -> bytes:
    return blob[:-8] + bytes([blob[-8] ^ 1]) + blob[-7:]


@pytest.mark.parametrize(
    "blob", [ONE, gzip.compress(RAW[:1000]) + gzip.compress(RAW[1000:])], ids=["one-member", "two-members"]
)
def test_good_gzip_layer_files_unpack(tmp_path: Path, blob: bytes) -> None:
    layer = tmp_path / "layer"
    layer.write_bytes(blob)
    apply_layers(tmp_path / "root", [(layer, DIFF_ID)], rootless=True)
    assert (tmp_path / "root/etc/motd").read_text() == "hello\n"
    assert (tmp_path / "root/usr/lib/big").stat().st_size == 300_000


@pytest.mark.parametrize(
    "blob",
    [
        ONE[:-4],
        ONE[: len(ONE) // 2],
        damaged_crc(ONE),
        ONE + b"junk",
        ONE + b"\x00" * 8,
        gzip.compress(b""),
        b"",
    ],
    ids=["no-size", "half", "bad-crc", "junk-after", "zeros-after", "empty-member", "empty"],
)
def test_bad_gzip_layer_files_are_refused(tmp_path: Path, blob: bytes) -> None:
    layer = tmp_path / "layer"
    layer.write_bytes(blob)
    with pytest.raises(LayerError):
        apply_layers(tmp_path / "root", [(layer, DIFF_ID)], rootless=True)


def test_a_gzip_layer_file_with_other_content_fails_its_diff_id(tmp_path: Path) -> None:
    layer = tmp_path / "layer"
    layer.write_bytes(gzip.compress(tar_bytes([F("etc/motd", "other\n")])))
    with pytest.raises(IntegrityError, match="DiffID"):
        apply_layers(tmp_path / "root", [(layer, DIFF_ID)], rootless=True)
