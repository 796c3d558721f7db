"""
Checking that an ISO is bootable, with a one-line reason when it is not,
and adding files to ISOs that are not reference livecds.
"""

import io
import os
import stat
import subprocess
import sys

import pycdlib
import pytest

from cpushare.vm import isoimage, livecd
from cpushare.vm.isoimage import ImageError, addFiles, checkBootable
from test.unit.livecdfakes import otherISO


@pytest.fixture
def other(tmp_path):
    return otherISO(str(tmp_path / "other.iso"))


def files(tmp_path):
    folder = tmp_path / "job"
    (folder / "results" / "2024").mkdir(parents=True)
    (folder / "start").write_text("#!/bin/sh\n")
    (folder / "start").chmod(0o755)
    (folder / "A Long Name With Spaces.tar.gz").write_bytes(b"x" * 3000)
    (folder / "a-long-name-with-dashes.tar.gz").write_bytes(b"y")
    (folder / "results" / "2024" / "out.csv").write_text("1,2\n")
    (folder / "latest").symlink_to("results/2024")
    return str(folder)


def test_a_bootable_iso_passes(other):
    info = checkBootable(other)
    assert info.platforms == (0,)
    assert info.size == os.path.getsize(other)


def test_a_missing_file(tmp_path):
    with pytest.raises(ImageError, match=r"cannot read .*nothing.iso: No such file"):
        checkBootable(str(tmp_path / "nothing.iso"))


def test_a_folder(tmp_path):
    with pytest.raises(ImageError, match="is not a file"):
        checkBootable(str(tmp_path))


def test_an_empty_file(tmp_path):
    (tmp_path / "empty.iso").write_bytes(b"")
    with pytest.raises(ImageError, match="empty.iso is not an ISO image: it is 0 bytes, too short"):
        checkBootable(str(tmp_path / "empty.iso"))


def test_a_file_that_is_not_an_iso(tmp_path):
    (tmp_path / "random.iso").write_bytes(os.urandom(200_000))
    with pytest.raises(ImageError, match=r"random.iso is not an ISO image: no ISO 9660 volume descriptor \(CD001\)"):
        checkBootable(str(tmp_path / "random.iso"))


def test_a_truncated_iso(tmp_path, other):
    data = open(other, "rb").read()
    (tmp_path / "cut.iso").write_bytes(data[: len(data) - 4096])
    with pytest.raises(ImageError, match=f"cut.iso is truncated: its volume descriptor says {len(data)} bytes"):
        checkBootable(str(tmp_path / "cut.iso"))


def test_an_iso_cut_inside_its_descriptors(tmp_path, other):
    data = open(other, "rb").read()
    (tmp_path / "cut.iso").write_bytes(data[: 17 * 2048 + 100])
    with pytest.raises(ImageError, match="cut.iso is truncated"):
        checkBootable(str(tmp_path / "cut.iso"))


def test_an_iso_without_el_torito(tmp_path):
    path = otherISO(str(tmp_path / "data.iso"), bootable=False)
    with pytest.raises(ImageError, match="data.iso is not bootable: it has no El Torito boot record"):
        checkBootable(path)


def test_an_iso_that_only_boots_on_uefi(tmp_path):
    path = otherISO(str(tmp_path / "efi.iso"), efiOnly=True)
    with pytest.raises(ImageError, match="efi.iso is not bootable on a BIOS: its El Torito entries are for UEFI only"):
        checkBootable(path)


def test_a_damaged_boot_catalog(tmp_path, other):
    iso = pycdlib.PyCdlib()
    iso.open(other)
    catalog = iso.get_record(iso_path="/BOOT.CAT;1").extent_location()
    iso.close()
    data = bytearray(open(other, "rb").read())
    data[catalog * 2048 + 30] = 0  # the 55 AA key of the validation entry
    (tmp_path / "bad.iso").write_bytes(bytes(data))
    with pytest.raises(ImageError, match="bad.iso is not bootable: its El Torito boot catalog is damaged"):
        checkBootable(str(tmp_path / "bad.iso"))


def test_messages_are_one_line(tmp_path, other):
    (tmp_path / "random.iso").write_bytes(os.urandom(100_000))
    for path in (str(tmp_path / "random.iso"), str(tmp_path / "missing.iso")):
        with pytest.raises(ImageError) as e:
            checkBootable(path)
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_the_cli_rejects_a_broken_base_in_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "job").mkdir()
    (tmp_path / "broken.iso").write_bytes(b"\0" * 40_000)
    done = subprocess.run(
        [sys.executable, "-c", "from cpushare.client.cli.main import main; main()",
         "--home", str(tmp_path / "home"), "image", "build",
         "--base", str(tmp_path / "broken.iso"), "--add", str(tmp_path / "job"),
         "-o", str(tmp_path / "out.iso")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "cpushare: broken.iso is not an ISO image: no ISO 9660 volume descriptor (CD001) at sector 16"
    ]
    assert sorted(os.listdir(tmp_path)) == ["broken.iso", "job"]


def walk(iso, **kw):
    return {d: sorted(f) for d, _, f in iso.walk(**kw)}


def read(iso, **kw):
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, **kw)
    return out.getvalue()


def test_files_go_under_cpushare_in_every_tree_and_boot_is_kept(tmp_path, other):
    output = str(tmp_path / "out.iso")
    count = addFiles(other, [files(tmp_path)], output)
    assert count == 5
    checkBootable(output)
    iso = pycdlib.PyCdlib()
    iso.open(output)
    try:
        rr = walk(iso, rr_path="/cpushare")
        assert rr["/cpushare"] == sorted([
            "A Long Name With Spaces.tar.gz", "a-long-name-with-dashes.tar.gz", "latest", "start"])
        assert rr["/cpushare/results/2024"] == ["out.csv"]
        assert read(iso, rr_path="/cpushare/results/2024/out.csv") == b"1,2\n"
        assert iso.file_mode(rr_path="/cpushare/start") & 0o777 == 0o755
        assert iso.get_record(rr_path="/cpushare/latest").rock_ridge.symlink_path() == b"results/2024"
        isoNames = walk(iso, iso_path="/CPUSHARE")["/CPUSHARE"]
        assert isoNames == sorted(["A_LONG_N.GZ;1", "A_LONG_1.GZ;1", "LATEST;1", "START;1"])
        joliet = walk(iso, joliet_path="/cpushare")["/cpushare"]
        assert "A Long Name With Spaces.tar.gz" in joliet
        # the original content and boot image are still there
        assert read(iso, rr_path="/README.txt") == b"another system\n"
        entry = iso.eltorito_boot_catalog.initial_entry
        assert entry.get_rba() == iso.get_record(iso_path="/BOOT.IMG;1").extent_location()
        assert read(iso, iso_path="/BOOT.IMG;1").startswith(b"\xeb\xfe")
    finally:
        iso.close()


def test_adding_again_replaces_equal_names(tmp_path, other):
    first = str(tmp_path / "first.iso")
    addFiles(other, [files(tmp_path)], first)
    newer = tmp_path / "newer"
    (newer / "results" / "2024").mkdir(parents=True)
    (newer / "results" / "2024" / "out.csv").write_text("3,4\n")
    second = str(tmp_path / "second.iso")
    addFiles(first, [str(newer)], second)
    iso = pycdlib.PyCdlib()
    iso.open(second)
    try:
        assert read(iso, rr_path="/cpushare/results/2024/out.csv") == b"3,4\n"
        assert walk(iso, iso_path="/CPUSHARE/RESULTS/2024")["/CPUSHARE/RESULTS/2024"] == ["OUT.CSV;1"]
        assert read(iso, rr_path="/cpushare/start") == b"#!/bin/sh\n"
    finally:
        iso.close()


def test_an_iso_without_rock_ridge_gets_8_3_names(tmp_path):
    base = otherISO(str(tmp_path / "plain.iso"), rockRidge=False, joliet=False)
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "data.file.txt").write_text("a")
    (folder / "data.file2.txt").write_text("b")
    output = str(tmp_path / "out.iso")
    addFiles(base, [str(folder)], output)
    iso = pycdlib.PyCdlib()
    iso.open(output)
    try:
        assert walk(iso, iso_path="/CPUSHARE")["/CPUSHARE"] == ["DATA_FI1.TXT;1", "DATA_FIL.TXT;1"]
    finally:
        iso.close()


def test_a_symlink_needs_rock_ridge(tmp_path):
    base = otherISO(str(tmp_path / "plain.iso"), rockRidge=False)
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "link").symlink_to("elsewhere")
    with pytest.raises(ImageError, match="link is a symbolic link, and plain.iso has no Rock Ridge"):
        addFiles(base, [str(folder)], str(tmp_path / "out.iso"))
    assert not os.path.exists(tmp_path / "out.iso")


def test_the_build_command_adds_to_other_isos_on_the_cdrom(tmp_path, other):
    result = livecd.build(str(tmp_path / "out.iso"), [files(tmp_path)], base=other)
    assert "other.iso with 5 files added under /cpushare/ on the cdrom" in result.description
    assert any("must mount the cdrom" in note for note in result.notes)
    assert stat.S_ISREG(os.stat(tmp_path / "out.iso").st_mode)
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == [], "no temporary files left"


def test_iso_names_are_unique_and_valid():
    taken = set()
    names = [isoimage._isoName(n, False, taken) for n in ("a.b.c", "A.B.C", "éé.txt", ".profile", "x" * 20)]
    assert names == ["A_B.C", "A_B1.C", "__.TXT", "_.PRO", "XXXXXXXX"]
