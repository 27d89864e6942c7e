import hashlib
import io
import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from shards.images import BadImage, reencode
from shards.reader import iter_members, iter_samples, read_range, split_name
from shards.writer import ShardWriter


def jpeg(color, size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def write(path, samples):
    with ShardWriter(path) as w:
        for key, files in samples:
            w.write(key, files)
        return w.close()


SAMPLES = [
    (
        f"k{i:03d}",
        {"jpg": jpeg((i, 0, 0)), "cls": str(i).encode(), "json": json.dumps({"i": i}).encode()},
    )
    for i in range(20)
]


def test_writer_is_deterministic_and_hash_matches(tmp_path):
    a = write(tmp_path / "a.tar", SAMPLES)
    b = write(tmp_path / "b.tar", SAMPLES)
    assert a.sha256 == b.sha256 == hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest()
    assert a.samples == 20 and a.bytes == (tmp_path / "a.tar").stat().st_size
    assert a.bytes % tarfile.RECORDSIZE == 0
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind


def test_tar_members_have_fixed_metadata_and_sorted_extensions(tmp_path):
    write(tmp_path / "a.tar", SAMPLES)
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["k000.cls", "k000.jpg", "k000.json"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {
        (0, 0, 0, "", "", 0o444)
    }


def test_readers_agree_with_webdataset(tmp_path):
    write(tmp_path / "a.tar", SAMPLES)
    ours = list(iter_samples(tmp_path / "a.tar"))
    theirs = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False))
    assert [k for k, _ in ours] == [s["__key__"] for s in theirs]
    assert all(files["jpg"] == s["jpg"] for (_, files), s in zip(ours, theirs, strict=True))
    member = next(m for m in iter_members(tmp_path / "a.tar") if m.key == "k005" and m.ext == "jpg")
    assert read_range(tmp_path / "a.tar", member.offset, member.size) == SAMPLES[5][1]["jpg"]


def test_split_name_follows_webdataset():
    assert split_name("dir/abc.seg.png") == ("dir/abc", "seg.png")
    assert split_name("abc") == ("abc", "")


def test_abort_leaves_nothing(tmp_path):
    try:
        with ShardWriter(tmp_path / "x.tar") as w:
            w.write("a", {"cls": b"1"})
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []


def test_reencode_bounds_size_and_rejects_bad_bytes():
    img = reencode(jpeg((10, 200, 30), (300, 120)), max_side=64, quality=90)
    assert (img.width, img.height) == (64, 26)
    assert Image.open(io.BytesIO(img.data)).format == "JPEG"
    good = jpeg((1, 2, 3), (64, 64))
    for bad in (b"not an image", good[: len(good) // 2], jpeg((0, 0, 0), (4, 4))):
        try:
            reencode(bad, 64, 90)
        except BadImage:
            continue
        raise AssertionError("bad bytes were accepted")


def test_header_walk_matches_tarfile_on_foreign_tars(tmp_path):
    """Tars written by other tools: GNU long names, pax paths, ustar prefixes, directories."""
    from shards.reader import CorruptTar, iter_entries

    long_name = "d/" + "x" * 150 + ".jpg"
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            names = ["a/b.jpg", "ünï.cls", ("p" * 90 + "/" + "q" * 60 + ".txt")]
            if fmt != tarfile.USTAR_FORMAT:
                names.append(long_name)
            dir_info = tarfile.TarInfo("a")
            dir_info.type = tarfile.DIRTYPE
            tar.addfile(dir_info)
            for i, name in enumerate(names):
                info = tarfile.TarInfo(name)
                info.size = 700 + i
                tar.addfile(info, io.BytesIO(bytes([i]) * info.size))
        data = path.read_bytes()
        with tarfile.open(path) as tar:
            expected = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
        assert list(iter_entries(data)) == expected
    broken = bytearray(data)
    broken[0] ^= 0x01
    try:
        list(iter_entries(bytes(broken)))
    except CorruptTar:
        pass
    else:
        raise AssertionError("a damaged header went unnoticed")


@pytest.mark.parametrize("name", ["a.jpg", "000000001.json", "x" * 99, "x" * 100, "é.txt"])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 12_345_678, 8**11 - 1, 8**11])
def test_fast_member_header_is_tarfiles_byte_for_byte(name, size):
    from shards.writer import _member_header, _tarfile_header

    assert _member_header(name, size) == _tarfile_header(name, size)
