"""The newc cpio writer the livecd's initrds are made with."""

import io
import os
import stat

import pytest

from cpushare.vm.cpio import CpioWriter, normalName, readArchive


def archive(build):
    out = io.BytesIO()
    writer = CpioWriter(out)
    build(writer)
    writer.close()
    return out.getvalue()


def test_one_file_is_laid_out_as_the_kernel_reads_it():
    data = archive(lambda w: w.addBytes("init", b"#!/bin/sh\n", 0o755, mtime=0x5F5E100))
    assert data[:6] == b"070701"
    fields = [int(data[6 + 8 * i: 14 + 8 * i], 16) for i in range(13)]
    ino, mode, uid, gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, check = fields
    assert mode == stat.S_IFREG | 0o755
    assert (uid, gid, nlink, mtime, size) == (0, 0, 1, 0x5F5E100, 10)
    assert (rmaj, rmin, namesize, check) == (0, 0, len("init") + 1, 0)
    # 110-byte header + "init\0" = 115, padded to 116; then the body, padded to 4
    assert data[110:116] == b"init\0\0"
    assert data[116:126] == b"#!/bin/sh\n"
    assert data[126:128] == b"\0\0"
    assert data[128:134] == b"070701"
    assert b"TRAILER!!!\0" in data
    assert len(data) % 512 == 0


def test_entries_read_back_with_their_types_and_modes():
    def build(w):
        w.addDirectory("etc", 0o750)
        w.addBytes("etc/profile", b"PS1=x\n")
        w.addSymlink("bin/sh", "busybox")
        w.addCharDevice("dev/console", 5, 1)
        w.addBytes("empty", b"")

    entries = readArchive(archive(build))
    byName = {name: (mode, body) for name, mode, body in entries}
    assert byName["etc"][0] == stat.S_IFDIR | 0o750
    assert byName["etc/profile"] == (stat.S_IFREG | 0o644, b"PS1=x\n")
    assert byName["bin"][0] == stat.S_IFDIR | 0o755, "parents are made"
    assert byName["bin/sh"] == (stat.S_IFLNK | 0o777, b"busybox")
    assert stat.S_ISCHR(byName["dev/console"][0])
    assert byName["empty"] == (stat.S_IFREG | 0o644, b"")
    names = [name for name, _, _ in entries]
    assert names.index("bin") < names.index("bin/sh")
    assert names.index("dev") < names.index("dev/console")


def test_device_numbers_are_stored():
    data = archive(lambda w: w.addCharDevice("dev/null", 1, 3, 0o666))
    # the second entry (after the "dev" parent) holds the device
    second = data.index(b"070701", 6)
    fields = [int(data[second + 6 + 8 * i: second + 14 + 8 * i], 16) for i in range(13)]
    assert fields[1] == stat.S_IFCHR | 0o666
    assert (fields[9], fields[10]) == (1, 3)


@pytest.mark.parametrize("name, stored", [
    ("/cpushare/start", "cpushare/start"),
    ("./a//b/./c", "a/b/c"),
    ("init", "init"),
])
def test_names_are_stored_relative(name, stored):
    assert normalName(name) == stored


@pytest.mark.parametrize("name", ["", "/", "../etc/passwd", "a/../../b"])
def test_names_cannot_leave_the_root(name):
    with pytest.raises(ValueError):
        normalName(name)


def test_a_tree_keeps_executables_and_links(tmp_path):
    job = tmp_path / "job"
    (job / "lib" / "deep").mkdir(parents=True)
    (job / "start").write_text("#!/bin/sh\necho hi\n")
    (job / "start").chmod(0o755)
    (job / "lib" / "deep" / "data.bin").write_bytes(os.urandom(5000))
    (job / "lib" / "deep" / "data.bin").chmod(0o600)
    (job / "current").symlink_to("lib/deep")

    entries = readArchive(archive(lambda w: w.addTree(str(job), "cpushare")))
    byName = {name: (mode, body) for name, mode, body in entries}
    assert set(byName) == {
        "cpushare", "cpushare/current", "cpushare/lib", "cpushare/lib/deep",
        "cpushare/lib/deep/data.bin", "cpushare/start",
    }
    assert byName["cpushare/start"][0] == stat.S_IFREG | 0o755
    assert byName["cpushare/lib/deep/data.bin"] == (
        stat.S_IFREG | 0o600, (job / "lib" / "deep" / "data.bin").read_bytes())
    assert byName["cpushare/current"] == (stat.S_IFLNK | 0o777, b"lib/deep")


def test_a_tree_with_a_fifo_is_refused_naming_it(tmp_path):
    (tmp_path / "job").mkdir()
    os.mkfifo(tmp_path / "job" / "pipe")
    with pytest.raises(ValueError, match="pipe is not a regular file"):
        archive(lambda w: w.addTree(str(tmp_path / "job"), "cpushare"))


def test_concatenated_archives_read_as_one():
    first = archive(lambda w: w.addBytes("a", b"1"))
    second = archive(lambda w: w.addBytes("a", b"2"))
    assert [(n, b) for n, _, b in readArchive(first + second)] == [("a", b"1"), ("a", b"2")]


def test_nothing_can_be_added_after_close():
    writer = CpioWriter(io.BytesIO())
    writer.close()
    with pytest.raises(ValueError, match="closed"):
        writer.addBytes("late", b"")
