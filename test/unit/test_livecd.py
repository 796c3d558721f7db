"""
The reference livecd's ISO structure, its initrds and the layers `--base`
adds, read back with pycdlib; made from stand-in parts (no download, no boot:
test/vm/ boots the real thing).
"""

import base64
import gzip
import io
import json
import os
import stat
import struct
import subprocess
import sys

import attr
import pycdlib
import pytest

from cpushare.vm import livecd
from cpushare.vm.cpio import readArchive
from cpushare.vm.isoimage import ImageError, checkBootable
from test.unit.livecdfakes import fakeParts


def job(tmp_path, name="job", start="#!/bin/sh\necho started\n", executable=True):
    folder = tmp_path / name
    (folder / "lib").mkdir(parents=True)
    (folder / "lib" / "data.txt").write_text(f"data of {name}\n")
    if start is not None:
        (folder / "start").write_text(start)
        (folder / "start").chmod(0o755 if executable else 0o644)
    return str(folder)


def publicKey(kind="ssh-ed25519", comment="bob@desk"):
    """An authorized_keys line of C{kind} (its blob starts with its type, as real ones do)."""
    blob = struct.pack(">I", len(kind)) + kind.encode() + struct.pack(">I", 32) + os.urandom(32)
    return f"{kind} {base64.b64encode(blob).decode()} {comment}"


def keyFile(tmp_path, name, *lines):
    path = tmp_path / name
    path.write_text("".join(f"{line}\n" for line in lines))
    return str(path)


def opened(path):
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    return iso


def read(iso, path):
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, rr_path=path)
    return out.getvalue()


def initrd(iso, path):
    return {name: (mode, body) for name, mode, body in readArchive(gzip.decompress(read(iso, path)))}


@pytest.fixture
def parts(tmp_path):
    return fakeParts(str(tmp_path / "parts"))


@pytest.fixture
def built(tmp_path, parts):
    output = tmp_path / "job.iso"
    livecd.buildLivecd(str(output), parts, [job(tmp_path)])
    iso = opened(output)
    yield output, iso
    iso.close()


def test_isolinux_boots_from_the_el_torito_catalog(built):
    output, iso = built
    catalog = iso.eltorito_boot_catalog
    assert catalog is not None
    entry = catalog.initial_entry
    assert entry.boot_indicator == 0x88, "bootable"
    assert entry.boot_media_type == 0, "no emulation"
    assert entry.sector_count == 4
    assert catalog.validation_entry.platform_id == 0, "x86 BIOS"
    record = iso.get_record(rr_path="/isolinux/isolinux.bin")
    assert entry.get_rba() == record.extent_location()
    # the boot info table isolinux needs: PVD at 16, its own extent and length
    image = read(iso, "/isolinux/isolinux.bin")
    pvd, extent, length = struct.unpack_from("<III", image, 8)
    assert (pvd, extent, length) == (16, record.extent_location(), len(image))
    info = checkBootable(str(output))
    assert info.platforms == (0,)


def test_isolinux_starts_the_kernel_with_both_initrds_at_once(built):
    _, iso = built
    config = read(iso, "/isolinux/isolinux.cfg").decode()
    lines = [line.strip() for line in config.splitlines()]
    assert "PROMPT 0" in lines and "TIMEOUT 0" in lines
    assert "KERNEL /boot/vmlinuz" in lines
    [append] = [line for line in lines if line.startswith("APPEND ")]
    assert "initrd=/boot/initrd.img,/boot/files1.img" in append.split()
    assert "console=ttyS0" in append.split()
    assert read(iso, "/isolinux/ldlinux.c32").startswith(b"ldlinux")


def test_the_kernel_and_both_initrds_are_on_the_iso(built, parts):
    _, iso = built
    assert read(iso, "/boot/vmlinuz") == open(parts.kernel, "rb").read()
    names = {name for _, _, files in iso.walk(rr_path="/boot") for name in files}
    assert names == {"vmlinuz", "initrd.img", "files1.img"}
    jolietNames = {name for _, _, files in iso.walk(joliet_path="/boot") for name in files}
    assert jolietNames == names


def test_the_system_initrd_holds_busybox_init_and_the_nic_modules(built, parts):
    _, iso = built
    system = initrd(iso, "/boot/initrd.img")
    mode, init = system["init"]
    assert mode == stat.S_IFREG | 0o755
    init = init.decode()
    assert init.startswith("#!/bin/busybox sh\n")
    for step in ("mount -t proc", "mount -t sysfs", "mount -t devtmpfs", "insmod",
                 "udhcpc -i eth0", "CPUSHARE-READY mac=", "/cpushare/start", "exec /bin/busybox init"):
        assert step in init
    assert system["bin/busybox"] == (stat.S_IFREG | 0o755, open(parts.busybox, "rb").read())
    assert stat.S_ISCHR(system["dev/console"][0])
    assert "ttyS0::respawn:" in system["etc/inittab"][1].decode()
    assert system["etc/cpushare/udhcpc.sh"][0] == stat.S_IFREG | 0o755
    modules = system["etc/cpushare/modules"][1].decode().split()
    assert modules == [
        "lib/modules/9.9.9-1-amd64/kernel/drivers/virtio/virtio.ko",
        "lib/modules/9.9.9-1-amd64/kernel/drivers/net/virtio_net.ko",
    ]
    for module in modules:
        assert system[module][1].startswith(b"\x7fELF")


def test_the_system_initrd_holds_cpushare_result(built):
    _, iso = built
    system = initrd(iso, "/boot/initrd.img")
    mode, script = system["usr/bin/cpushare-result"]
    assert mode == stat.S_IFREG | 0o755
    assert script.decode() == livecd.RESULT_SCRIPT


def test_the_system_initrd_holds_the_ssh_server_and_what_it_loads(built, parts):
    _, iso = built
    system = initrd(iso, "/boot/initrd.img")
    for host, guest in parts.ssh:
        assert system[guest] == (stat.S_IFREG | 0o755, open(host, "rb").read())
    assert system["usr/sbin/dropbear"][1].startswith(b"\x7fELF")
    assert system["lib64/ld-linux-x86-64.so.2"][1].startswith(b"\x7fELF")
    assert system["etc/dropbear"][0] == stat.S_IFDIR | 0o700, "where -R writes the host keys"
    assert system["root"][0] == stat.S_IFDIR | 0o700
    assert system["etc/passwd"][1] == b"root:x:0:0:root:/root:/bin/sh\n"
    assert system["etc/shells"][1] == b"/bin/sh\n"
    init = system["init"][1].decode()
    [start] = [line.strip() for line in init.splitlines() if line.strip().startswith("/usr/sbin/dropbear")]
    flags = start.split()
    assert "-s" in flags, "no password logins"
    assert "-R" in flags, "host keys made at the first connection"
    assert "-w" not in flags, "root may log in"
    assert "-F" in flags and start.endswith("&")
    # it is started before DHCP, and listens on port 22 (0x16) before the readiness line
    listening = init.index("00000000:0016 00000000:0000 0A")
    assert init.index(start) < init.index("udhcpc -i eth0") < listening < init.index("CPUSHARE-READY")
    assert "cat /etc/cpushare/authorized_keys.d/* > /root/.ssh/authorized_keys" in init
    assert "chmod 600 /root/.ssh/authorized_keys" in init
    assert "mkdir -p -m 700 /root/.ssh" in init


def test_ssh_keys_go_in_the_files_layer_readable_by_root_alone(tmp_path, parts):
    keys = [publicKey(), publicKey("ssh-rsa", "alice@laptop")]
    first = keyFile(tmp_path, "id_ed25519.pub", "# my key", keys[0], "")
    second = keyFile(tmp_path, "alice.pub", keys[1])
    output = tmp_path / "keys.iso"
    livecd.buildLivecd(str(output), parts, [job(tmp_path)],
                       keys=livecd.readPublicKeys(first) + livecd.readPublicKeys(second))
    iso = opened(output)
    try:
        files = initrd(iso, "/boot/files1.img")
        assert files["etc/cpushare/authorized_keys.d"][0] == stat.S_IFDIR | 0o700
        mode, body = files["etc/cpushare/authorized_keys.d/files1"]
        assert mode == stat.S_IFREG | 0o600
        assert body.decode() == f"{keys[0]}\n{keys[1]}\n"
        assert files["cpushare/start"][0] == stat.S_IFREG | 0o755
        assert json.loads(read(iso, "/cpushare-livecd.json"))["ssh"] == "dropbear"
    finally:
        iso.close()


def test_keys_alone_make_a_layer(tmp_path, parts):
    output = tmp_path / "keys.iso"
    livecd.buildLivecd(str(output), parts, keys=[publicKey()])
    iso = opened(output)
    try:
        assert "initrd=/boot/initrd.img,/boot/files1.img " in read(iso, "/isolinux/isolinux.cfg").decode()
        assert "etc/cpushare/authorized_keys.d/files1" in initrd(iso, "/boot/files1.img")
    finally:
        iso.close()


def test_a_base_build_adds_keys_to_those_of_its_base(tmp_path, parts):
    base = tmp_path / "base.iso"
    old, new = publicKey(comment="old"), publicKey(comment="new")
    livecd.buildLivecd(str(base), parts, [job(tmp_path)], keys=[old])
    output = tmp_path / "more.iso"
    result = livecd.build(str(output), base=str(base), sshKeys=[keyFile(tmp_path, "new.pub", new)])
    assert result.description == "base.iso (a reference livecd) with 1 ssh key for root, in initrd layer 2"
    iso = opened(output)
    try:
        assert initrd(iso, "/boot/files1.img")["etc/cpushare/authorized_keys.d/files1"][1] == \
            f"{old}\n".encode()
        assert initrd(iso, "/boot/files2.img")["etc/cpushare/authorized_keys.d/files2"] == \
            (stat.S_IFREG | 0o600, f"{new}\n".encode())
    finally:
        iso.close()


def test_a_build_without_keys_says_ssh_logins_are_impossible(tmp_path, monkeypatch, parts):
    from cpushare.vm import livecdparts
    monkeypatch.setattr(livecdparts.PartsCache, "fetch", lambda self: parts)
    result = livecd.build(str(tmp_path / "job.iso"), [job(tmp_path)])
    assert result.notes == [
        "no ssh key in the image: its VMs take no ssh logins (give --ssh-key FILE.pub)"]


def test_the_default_keys_are_the_users_public_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert livecd.defaultKeyFiles() == []
    (tmp_path / ".ssh").mkdir()
    for name in ("id_rsa", "id_rsa.pub", "id_ed25519.pub", "authorized_keys", "known_hosts"):
        (tmp_path / ".ssh" / name).write_text("x")
    assert livecd.defaultKeyFiles() == [
        str(tmp_path / ".ssh" / "id_ed25519.pub"), str(tmp_path / ".ssh" / "id_rsa.pub")]


@pytest.mark.parametrize("content, message", [
    ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
     "is a private key; give its public key ({path}.pub)"),
    ("hello world\n", "line 1 is not an OpenSSH public key"),
    ("# only a comment\n\n", "holds no public key"),
    (publicKey("ssh-dss") + "\n", "line 1: the guest's ssh server takes no ssh-dss keys, only ssh-ed25519,"),
    ("ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAAAgQC bob\n", "line 1: the ssh-ed25519 key is damaged"),
    ("ssh-ed25519 AAAA%%%% bob\n", "line 1 is not an OpenSSH public key"),
], ids=["private-key", "text", "comment-only", "ssh-dss", "damaged-blob", "not-base64"])
def test_what_is_not_a_public_key_file_is_refused_by_name(tmp_path, content, message):
    path = tmp_path / "key"
    path.write_text(content)
    with pytest.raises(ImageError) as e:
        livecd.readPublicKeys(str(path))
    assert str(e.value).startswith(f"--ssh-key {path}")
    assert message.format(path=path) in str(e.value)


def test_a_key_file_that_cannot_be_read_is_named(tmp_path):
    with pytest.raises(ImageError, match=r"--ssh-key .*missing.pub: cannot read it: No such file"):
        livecd.readPublicKeys(str(tmp_path / "missing.pub"))
    binary = tmp_path / "binary.pub"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ImageError, match="is not a public key file: it is not text"):
        livecd.readPublicKeys(str(binary))


def test_options_before_a_key_are_kept(tmp_path):
    line = 'no-port-forwarding,command="uptime" ' + publicKey()
    assert livecd.readPublicKeys(keyFile(tmp_path, "k.pub", line)) == [line]


def test_keys_go_only_into_a_reference_livecd_with_an_ssh_server(tmp_path, parts):
    from test.unit.livecdfakes import otherISO
    key = keyFile(tmp_path, "k.pub", publicKey())
    other = otherISO(str(tmp_path / "other.iso"))
    with pytest.raises(ImageError, match="other.iso is not a reference livecd: --ssh-key"):
        livecd.build(str(tmp_path / "out.iso"), base=other, sshKeys=[key])
    old = tmp_path / "old.iso"
    livecd.buildLivecd(str(old), attr.evolve(parts, ssh=()), [job(tmp_path)])
    with pytest.raises(ImageError, match="old.iso has no ssh server .* build a new reference livecd"):
        livecd.build(str(tmp_path / "out.iso"), base=str(old), sshKeys=[key])
    assert not (tmp_path / "out.iso").exists()


def test_the_buyers_files_are_a_layer_at_cpushare(built):
    _, iso = built
    files = initrd(iso, "/boot/files1.img")
    assert files["cpushare/start"] == (stat.S_IFREG | 0o755, b"#!/bin/sh\necho started\n")
    assert files["cpushare/lib/data.txt"][1] == b"data of job\n"
    assert stat.S_ISDIR(files["cpushare"][0])


def test_the_iso_says_what_it_is(built):
    _, iso = built
    info = json.loads(read(iso, "/cpushare-livecd.json"))
    assert info["format"] == "cpushare-livecd"
    assert info["initrds"] == ["/boot/initrd.img", "/boot/files1.img"]
    assert info["kernel_version"] == "9.9.9-1-amd64"
    assert info["files_at"] == "/cpushare"
    assert livecd.readMarker(iso) == info


def test_without_files_there_is_no_layer(tmp_path, parts):
    output = tmp_path / "plain.iso"
    livecd.buildLivecd(str(output), parts)
    iso = opened(output)
    try:
        assert "initrd=/boot/initrd.img " in read(iso, "/isolinux/isolinux.cfg").decode()
        names = {name for _, _, files in iso.walk(rr_path="/boot") for name in files}
        assert names == {"vmlinuz", "initrd.img"}
    finally:
        iso.close()


def test_adding_to_a_reference_livecd_adds_a_layer(tmp_path, built):
    base, _ = built
    more = job(tmp_path, "more", start="#!/bin/sh\necho second\n")
    output = tmp_path / "more.iso"
    result = livecd.build(str(output), [more], base=str(base))
    assert "in initrd layer 2" in result.description
    iso = opened(output)
    try:
        config = read(iso, "/isolinux/isolinux.cfg").decode()
        assert "initrd=/boot/initrd.img,/boot/files1.img,/boot/files2.img" in config
        assert initrd(iso, "/boot/files1.img")["cpushare/lib/data.txt"][1] == b"data of job\n"
        assert initrd(iso, "/boot/files2.img")["cpushare/start"][1] == b"#!/bin/sh\necho second\n"
        assert json.loads(read(iso, "/cpushare-livecd.json"))["initrds"][-1] == "/boot/files2.img"
        assert iso.eltorito_boot_catalog is not None
    finally:
        iso.close()
    checkBootable(str(output))
    assert result.size == os.path.getsize(output)
    assert len(result.sha256) == 64


def test_later_folders_win_and_a_non_executable_start_is_noted(tmp_path, built):
    base, _ = built
    first = job(tmp_path, "first", start="#!/bin/sh\necho one\n")
    second = job(tmp_path, "second", start="#!/bin/sh\necho two\n", executable=False)
    output = tmp_path / "out.iso"
    result = livecd.build(str(output), [first, second], base=str(base))
    assert any("start is not an executable file" in n for n in result.notes)
    iso = opened(output)
    try:
        files = initrd(iso, "/boot/files2.img")
        assert files["cpushare/start"] == (stat.S_IFREG | 0o644, b"#!/bin/sh\necho two\n")
        assert files["cpushare/lib/data.txt"][1] == b"data of second\n"
    finally:
        iso.close()


def test_a_name_that_is_a_folder_in_one_add_and_a_file_in_another_is_refused(tmp_path, built):
    base, _ = built
    first = job(tmp_path, "first")
    second = tmp_path / "second"
    second.mkdir()
    (second / "lib").write_text("not a folder")
    with pytest.raises(ImageError, match="one is a folder and the other not"):
        livecd.build(str(tmp_path / "out.iso"), [first, str(second)], base=str(base))


def test_base_needs_files_to_add(tmp_path, built):
    base, _ = built
    with pytest.raises(ImageError, match="--base needs --add"):
        livecd.build(str(tmp_path / "out.iso"), [], base=str(base))


def test_add_must_be_a_folder(tmp_path, built):
    base, _ = built
    with pytest.raises(ImageError, match="not a folder"):
        livecd.build(str(tmp_path / "out.iso"), [str(tmp_path / "missing")], base=str(base))


def test_the_output_folder_must_exist(tmp_path, built):
    base, _ = built
    with pytest.raises(ImageError, match="no folder"):
        livecd.build(str(tmp_path / "no" / "out.iso"), [job(tmp_path, "other")], base=str(base))


def fakeCache(tmp_path):
    """A cache folder holding stand-in parts, as a download would have left it."""
    from cpushare.vm import livecdparts

    cache = tmp_path / "cache"
    folder = cache / "livecd" / "parts-9.9.9-1-amd64"
    parts = fakeParts(str(folder))
    (folder / "parts.json").write_text(json.dumps({
        "format": livecdparts.PARTS_FORMAT,
        "wanted": list(livecdparts.GUEST_MODULES),
        "kernel_version": parts.kernelVersion,
        "packages": parts.packages,
        "kernel": "vmlinuz",
        "modules": [f"modules/{rel}" for _, rel in parts.modules],
        "busybox": "busybox",
        "isolinux": "isolinux.bin",
        "ldlinux": "ldlinux.c32",
        "ssh": [guest for _, guest in parts.ssh],
    }))
    return cache


def test_a_build_reuses_the_parts_in_the_cache_without_apt(tmp_path, monkeypatch):
    from cpushare.vm import livecdparts

    cache = fakeCache(tmp_path)
    monkeypatch.setattr(livecdparts.shutil, "which", lambda name: None)
    key = keyFile(tmp_path, "id_ed25519.pub", publicKey())
    result = livecd.build(str(tmp_path / "job.iso"), [job(tmp_path)], cache=str(cache),
                          sshKeys=[key])
    assert result.description == (
        "reference livecd (Linux 9.9.9-1-amd64, busybox, dropbear) with 2 files at /cpushare/, "
        "1 ssh key for root")
    assert result.notes == []


def cli(tmp_path, *args):
    env = dict(os.environ, HOME=str(tmp_path / "user"), CPUSHARE_CACHE=str(fakeCache(tmp_path)))
    return subprocess.run(
        [sys.executable, "-c", "from cpushare.client.cli.main import main; main()",
         "--home", str(tmp_path / "home"), "image", "build", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )


@pytest.mark.slow
def test_the_cli_puts_the_users_own_public_key_in_by_default(tmp_path):
    ssh = tmp_path / "user" / ".ssh"
    ssh.mkdir(parents=True)
    key = publicKey(comment="user@desk")
    (ssh / "id_ed25519.pub").write_text(key + "\n")
    (ssh / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    done = cli(tmp_path, "-o", str(tmp_path / "job.iso"))
    assert done.returncode == 0, done
    assert f"adding your ssh key {ssh / 'id_ed25519.pub'} (--no-ssh-key leaves it out)" in done.stderr
    assert "with 1 ssh key for root" in done.stdout
    iso = opened(tmp_path / "job.iso")
    try:
        assert initrd(iso, "/boot/files1.img")["etc/cpushare/authorized_keys.d/files1"][1] == \
            f"{key}\n".encode()
    finally:
        iso.close()

    done = cli(tmp_path, "-o", str(tmp_path / "nokey.iso"), "--no-ssh-key")
    assert done.returncode == 0, done
    assert "cpushare: note: no ssh key in the image: its VMs take no ssh logins" in done.stderr
    iso = opened(tmp_path / "nokey.iso")
    try:
        assert {name for _, _, files in iso.walk(rr_path="/boot") for name in files} == {
            "vmlinuz", "initrd.img"}
    finally:
        iso.close()


@pytest.mark.slow
def test_the_cli_names_a_bad_key_or_contradicting_options_in_one_line(tmp_path):
    private = tmp_path / "id_rsa"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    done = cli(tmp_path, "-o", str(tmp_path / "job.iso"), "--ssh-key", str(private))
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.splitlines() == [
        f"cpushare: --ssh-key {private} is a private key; give its public key ({private}.pub)"]
    done = cli(tmp_path, "-o", str(tmp_path / "job.iso"), "--ssh-key", str(private), "--no-ssh-key")
    assert done.stderr.splitlines() == [
        "cpushare: --ssh-key and --no-ssh-key contradict each other: give one"]
    assert not (tmp_path / "job.iso").exists()


@pytest.mark.parametrize("line, fields", [
    ("CPUSHARE-READY mac=52:54:00:12:34:56 ip=10.0.2.15/24 gw=10.0.2.2 uptime=2.49",
     dict(mac="52:54:00:12:34:56", ip="10.0.2.15/24", address="10.0.2.15", prefix=24,
          gw="10.0.2.2", uptime=2.49)),
    ("\x1bc\x1b[2JCPUSHARE-READY mac=52:54:00:00:00:01 ip=none gw=none uptime=31.07\r",
     dict(mac="52:54:00:00:00:01", ip=None, address=None, prefix=None, gw=None, uptime=31.07)),
])
def test_readiness_lines_parse(line, fields):
    assert livecd.parseReady(line) == fields


@pytest.mark.parametrize("line", ["", "CPUSHARE-READY", "hello", "CPUSHARE-READY mac=x ip=y gw=z uptime=1"])
def test_other_lines_are_not_readiness_lines(line):
    assert livecd.parseReady(line) is None


def test_the_readiness_line_the_guest_prints_is_the_one_parsed():
    # the echo in /init, with the shell variables filled in
    [echo] = [line for line in livecd.INIT.splitlines() if "CPUSHARE-READY" in line]
    printed = (echo.split('"')[1]
               .replace("$mac", "52:54:00:ab:cd:ef").replace("${ip:-none}", "192.168.7.20/24")
               .replace("${gw:-none}", "none").replace("$(cut -d' ' -f1 /proc/uptime)", "3.50"))
    assert livecd.READY_FORMAT.format(
        mac="52:54:00:ab:cd:ef", ip="192.168.7.20/24", gw="none", uptime="3.50") == printed
    assert livecd.parseReady(printed)["address"] == "192.168.7.20"
