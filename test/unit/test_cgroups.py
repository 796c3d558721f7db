"""Cgroup v1 and v2 handling on fake /sys/fs/cgroup trees."""

import os

from cpushare.vm import cgroups


def write(path, text=""):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def read(path):
    with open(path) as f:
        return f.read()


def test_v2_delegates_controllers_and_caps_each_vm(tmp_path):
    root = str(tmp_path)
    mine = os.path.join(root, "user.slice", "seller.service")
    write(os.path.join(root, "cgroup.controllers"), "cpuset cpu io memory pids\n")
    write(os.path.join(mine, "cgroup.controllers"), "cpu memory pids\n")
    write(os.path.join(mine, "cgroup.subtree_control"), "")
    write(os.path.join(mine, "cgroup.procs"), "100\n101\n")
    proc = str(tmp_path / "self-cgroup")
    write(proc, "0::/user.slice/seller.service\n")
    # A fake tree does not make the kernel's files in new groups: pre-make them.
    base = os.path.join(mine, "cpushare-vms")
    write(os.path.join(base, "cgroup.subtree_control"), "")

    cg, text = cgroups.detect(root, proc)
    assert cg.version == 2 and text.startswith("cgroup v2")
    # The seller moved itself into a leaf so its group can delegate.
    assert read(os.path.join(mine, "cpushare-seller", "cgroup.procs")) in ("100", "101")
    assert read(os.path.join(mine, "cgroup.subtree_control")) == "+cpu +memory +pids"
    assert read(os.path.join(base, "cgroup.subtree_control")) == "+cpu +memory +pids"
    vm = os.path.join(base, "vm-7")
    os.makedirs(vm)
    write(os.path.join(vm, "pids.max"))
    group = cg.create("vm-7", 2, 640 * 2**20)
    assert read(os.path.join(vm, "cpu.max")) == "200000 100000"
    assert read(os.path.join(vm, "memory.max")) == str(640 * 2**20)
    assert read(os.path.join(vm, "pids.max")) == str(cgroups.PIDS_MAX)
    group.add(555)
    assert read(os.path.join(vm, "cgroup.procs")) == "555"
    write(os.path.join(vm, "cpu.stat"), "usage_usec 2500000\nuser_usec 2000000\n")
    assert group.cpuSeconds() == 2.5


def test_v2_without_delegated_controllers_says_so(tmp_path):
    root = str(tmp_path)
    write(os.path.join(root, "cgroup.controllers"), "cpu memory\n")
    write(os.path.join(root, "user", "cgroup.controllers"), "pids\n")
    proc = str(tmp_path / "self-cgroup")
    write(proc, "0::/user\n")
    cg, text = cgroups.detect(root, proc)
    assert cg is None
    assert "not delegated" in text and "cpu" in text


def test_v1_uses_each_controllers_own_hierarchy(tmp_path):
    root = str(tmp_path)
    for c in ("cpu", "cpuacct", "memory", "pids"):
        os.makedirs(os.path.join(root, c))
    write(os.path.join(root, "cpu", "cpushare-vms", "cpu.idle"), "0")
    proc = str(tmp_path / "self-cgroup")
    write(proc, "4:memory:/box/7\n2:cpuacct:/\n1:cpu:/\n8:pids:/\n0::/\n")
    cg, text = cgroups.detect(root, proc)
    assert cg.version == 1 and text.startswith("cgroup v1")
    assert text.endswith("VMs' group idle by cpu.idle")
    assert read(os.path.join(root, "cpu", "cpushare-vms", "cpu.idle")) == "1"
    assert cg.bases["memory"] == os.path.join(root, "memory", "box", "7", "cpushare-vms")
    group = cg.create("vm-1", 1, 300 * 2**20)
    assert read(os.path.join(root, "cpu", "cpushare-vms", "vm-1", "cpu.cfs_quota_us")) == "100000"
    assert read(os.path.join(cg.bases["memory"], "vm-1", "memory.limit_in_bytes")) == str(300 * 2**20)
    write(os.path.join(root, "cpuacct", "cpushare-vms", "vm-1", "cpuacct.usage"), "1500000000\n")
    assert group.cpuSeconds() == 1.5


def test_no_cgroup_filesystem_says_so(tmp_path):
    proc = str(tmp_path / "self-cgroup")
    write(proc, "0::/\n")
    cg, text = cgroups.detect(str(tmp_path / "nothing"), proc)
    assert cg is None and text.startswith("no cgroups")


def test_the_vms_group_is_marked_idle_with_what_the_kernel_offers(tmp_path):
    for files, version, expected in [
        (["cpu.idle", "cpu.shares"], 1, ("cpu.idle", "1")),
        (["cpu.shares"], 1, ("cpu.shares", "2")),
        (["cpu.idle", "cpu.weight"], 2, ("cpu.idle", "1")),
        (["cpu.weight"], 2, ("cpu.weight", "1")),
    ]:
        group = tmp_path / f"v{version}-{'-'.join(files)}"
        for name in files:
            write(str(group / name), "0")
        assert cgroups.markIdle(str(group), version) == expected[0]
        assert read(str(group / expected[0])) == expected[1]
    assert cgroups.markIdle(str(tmp_path / "nothing"), 1) is None
