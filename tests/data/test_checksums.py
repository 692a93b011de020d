"""SHA256SUMS parsing and verification, including a tampered copy."""
import hashlib
import shutil

import pytest

from svd_ray.data import ChecksumError, load_truthfulqa_mc, parse_sha256sums, verify_files


def _write(path, data: bytes):
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def test_parse_formats(tmp_path):
    a = _write(tmp_path / "a.json", b"[1]")
    b = _write(tmp_path / "b.txt", b"x")
    (tmp_path / "SHA256SUMS").write_text(f"{a}  ./a.json\n{b} *b.txt\n\n")
    assert parse_sha256sums(tmp_path / "SHA256SUMS") == {"a.json": a, "b.txt": b}
    assert verify_files(tmp_path) == {"a.json": a, "b.txt": b}


def test_bad_line_and_missing_sums(tmp_path):
    (tmp_path / "SHA256SUMS").write_text("not a checksum line\n")
    with pytest.raises(ChecksumError, match="SHA256SUMS:1"):
        parse_sha256sums(tmp_path / "SHA256SUMS")
    with pytest.raises(ChecksumError, match="not found"):
        verify_files(tmp_path / "nowhere", ["a.json"])


def test_real_files_verify(data_dir):
    assert set(verify_files(data_dir / "truthfulqa")) == {"mc_task.json", "TruthfulQA.csv", "LICENSE"}
    assert "ARC-Challenge/test.json" in verify_files(data_dir / "commonsense", ["./ARC-Challenge/test.json"])


@pytest.fixture
def tqa_copy(data_dir, tmp_path):
    dst = tmp_path / "data" / "truthfulqa"
    dst.mkdir(parents=True)
    for name in ("mc_task.json", "TruthfulQA.csv", "SHA256SUMS"):
        shutil.copy(data_dir / "truthfulqa" / name, dst / name)
    return tmp_path / "data"


def test_copy_loads(tqa_copy):
    assert len(load_truthfulqa_mc(tqa_copy).mc1) == 817


def test_flipped_byte_is_named(tqa_copy):
    f = tqa_copy / "truthfulqa" / "mc_task.json"
    data = bytearray(f.read_bytes())
    data[data.index(b"Vatican City")] ^= 0x01  # 'V' -> 'W', inside an answer string
    f.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"mc_task\.json: SHA-256 mismatch"):
        load_truthfulqa_mc(tqa_copy)
    # verification can be switched off explicitly (the flipped byte is inside an answer)
    load_truthfulqa_mc(tqa_copy, verify=False)


def test_missing_file_is_named(tqa_copy):
    (tqa_copy / "truthfulqa" / "TruthfulQA.csv").unlink()
    with pytest.raises(ChecksumError, match=r"TruthfulQA\.csv: listed in SHA256SUMS but the file is missing"):
        load_truthfulqa_mc(tqa_copy)


def test_unlisted_file_is_named(tmp_path):
    _write(tmp_path / "a.json", b"[]")
    (tmp_path / "SHA256SUMS").write_text("")
    with pytest.raises(ChecksumError, match=r"a\.json: not listed"):
        verify_files(tmp_path, ["a.json"])
