"""
Caps on each VM's CPU and memory with Linux control groups, v2 or v1.

Most desktops have cgroup v2 (one hierarchy, /sys/fs/cgroup/cgroup.controllers
exists); some machines, these test machines among them, have v1 (one
hierarchy per controller: /sys/fs/cgroup/cpu, /memory, /cpuacct, /pids).
`detect()` finds which the seller can use and says so; each VM then gets a
group of its own, below the seller's own group:

    v2: <seller's group>/cpushare-vms/vm-ID   cpu.max, memory.max, pids.max
    v1: <controller>/<seller's group>/cpushare-vms/vm-ID for cpu
        (cfs quota), memory (limit_in_bytes), cpuacct, pids

The VMs' group is marked idle (`cpu.idle = 1`, Linux 5.15 and later; the
smallest weight on older kernels): the scheduler shares CPU between groups
first, so a VM group of normal weight would take half a busy desktop's CPU
whatever the priority of QEMU inside it.  The CPU cap is the cores sold
(quota = cores x period); the memory cap is the memory sold plus QEMU's
own overhead.  CPU time used is read from the
group (v2 cpu.stat usage_usec, v1 cpuacct.usage).

These are small writes to a kernel filesystem, done directly.
"""

import os

from twisted.logger import Logger

log = Logger()

ROOT = "/sys/fs/cgroup"
CPU_PERIOD_US = 100000
QEMU_OVERHEAD_BYTES = 256 * 1024 * 1024
PIDS_MAX = 256
GROUP = "cpushare-vms"


class CgroupError(Exception):
    pass


def _write(path, value):
    with open(path, "w") as f:
        f.write(str(value))


def _read(path):
    with open(path) as f:
        return f.read()


def markIdle(cpuGroup, version):
    """
    Make a group's tasks run only when nothing else wants the CPU; returns
    how ("cpu.idle", or the weight file used), or None when neither exists.
    """
    idle = os.path.join(cpuGroup, "cpu.idle")
    if os.path.exists(idle):
        _write(idle, 1)
        return "cpu.idle"
    weight, lowest = ("cpu.weight", 1) if version == 2 else ("cpu.shares", 2)
    path = os.path.join(cpuGroup, weight)
    if os.path.exists(path):
        _write(path, lowest)
        return weight
    return None


def ownGroups(procFile="/proc/self/cgroup"):
    """{controller: path} for v1 hierarchies, with '' for the v2 one."""
    groups = {}
    for line in _read(procFile).splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            groups[c] = path
    return groups


class V2Group:
    version = 2

    def __init__(self, path):
        self.path = path

    def limit(self, cores, memoryBytes):
        _write(os.path.join(self.path, "cpu.max"), f"{cores * CPU_PERIOD_US} {CPU_PERIOD_US}")
        _write(os.path.join(self.path, "memory.max"), memoryBytes)
        if os.path.exists(os.path.join(self.path, "memory.swap.max")):
            _write(os.path.join(self.path, "memory.swap.max"), 0)
        if os.path.exists(os.path.join(self.path, "pids.max")):
            _write(os.path.join(self.path, "pids.max"), PIDS_MAX)

    def add(self, pid):
        _write(os.path.join(self.path, "cgroup.procs"), pid)

    def cpuSeconds(self):
        for line in _read(os.path.join(self.path, "cpu.stat")).splitlines():
            key, value = line.split()
            if key == "usage_usec":
                return int(value) / 1e6
        raise CgroupError("cpu.stat has no usage_usec")

    def limits(self):
        return {
            "cpu.max": _read(os.path.join(self.path, "cpu.max")).strip(),
            "memory.max": _read(os.path.join(self.path, "memory.max")).strip(),
        }

    def remove(self):
        _removeGroup(self.path)


class V1Group:
    version = 1

    def __init__(self, paths):
        self.paths = paths

    def limit(self, cores, memoryBytes):
        cpu = self.paths["cpu"]
        _write(os.path.join(cpu, "cpu.cfs_period_us"), CPU_PERIOD_US)
        _write(os.path.join(cpu, "cpu.cfs_quota_us"), cores * CPU_PERIOD_US)
        _write(os.path.join(self.paths["memory"], "memory.limit_in_bytes"), memoryBytes)
        if "pids" in self.paths:
            _write(os.path.join(self.paths["pids"], "pids.max"), PIDS_MAX)

    def add(self, pid):
        for path in self.paths.values():
            _write(os.path.join(path, "cgroup.procs"), pid)

    def cpuSeconds(self):
        return int(_read(os.path.join(self.paths["cpuacct"], "cpuacct.usage"))) / 1e9

    def limits(self):
        return {
            "cpu.cfs_quota_us": _read(os.path.join(self.paths["cpu"], "cpu.cfs_quota_us")).strip(),
            "memory.limit_in_bytes": _read(
                os.path.join(self.paths["memory"], "memory.limit_in_bytes")).strip(),
        }

    def remove(self):
        for path in self.paths.values():
            _removeGroup(path)


def _removeGroup(path):
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warn("could not remove cgroup {path}: {error}", path=path, error=e)


class Cgroups:
    """Where this seller makes its VMs' groups; C{version} is 1 or 2."""

    def __init__(self, version, bases):
        self.version = version
        self.bases = bases
        self.idle = markIdle(bases["" if version == 2 else "cpu"], version)

    def describe(self):
        where = ", ".join(sorted(set(self.bases.values())))
        idle = f"; VMs' group idle by {self.idle}" if self.idle else \
            "; the kernel cannot mark the VMs' group idle"
        return f"cgroup v{self.version} ({where}){idle}"

    def create(self, name, cores, memoryBytes):
        if self.version == 2:
            path = os.path.join(self.bases[""], name)
            os.makedirs(path, exist_ok=True)
            group = V2Group(path)
        else:
            paths = {}
            for controller, base in self.bases.items():
                paths[controller] = os.path.join(base, name)
                os.makedirs(paths[controller], exist_ok=True)
            group = V1Group(paths)
        try:
            group.limit(cores, memoryBytes)
        except OSError:
            group.remove()
            raise
        return group


def _v2Base(root, own):
    """
    Our own v2 group, with cpu, memory and pids delegated to a child group
    for VMs.  A group that holds processes cannot hand controllers to its
    children, so the seller first moves itself into a leaf of its own.
    """
    mine = os.path.join(root, own.lstrip("/"))
    base = os.path.join(mine, GROUP)
    os.makedirs(base, exist_ok=True)
    wanted = {"cpu", "memory", "pids"}
    available = set(_read(os.path.join(mine, "cgroup.controllers")).split())
    missing = {"cpu", "memory"} - available
    if missing:
        raise CgroupError(f"controllers {sorted(missing)} are not delegated to {mine}")
    enabled = set(_read(os.path.join(mine, "cgroup.subtree_control")).split())
    if not wanted & available <= enabled:
        procs = _read(os.path.join(mine, "cgroup.procs")).split()
        if procs:
            leaf = os.path.join(mine, "cpushare-seller")
            os.makedirs(leaf, exist_ok=True)
            for pid in procs:
                try:
                    _write(os.path.join(leaf, "cgroup.procs"), pid)
                except OSError:
                    pass
        _write(os.path.join(mine, "cgroup.subtree_control"),
               " ".join("+" + c for c in sorted(wanted & available)))
    _write(os.path.join(base, "cgroup.subtree_control"),
           " ".join("+" + c for c in sorted(wanted & available)))
    return base


def detect(root=ROOT, procFile="/proc/self/cgroup"):
    """
    The cgroups this process can use for VMs, or None with the reason.
    Returns (Cgroups or None, text saying what is used or why nothing is).
    """
    try:
        own = ownGroups(procFile)
        if os.path.exists(os.path.join(root, "cgroup.controllers")):
            cg = Cgroups(2, {"": _v2Base(root, own.get("", "/"))})
        else:
            bases = {}
            for controller in ("cpu", "cpuacct", "memory", "pids"):
                mount = os.path.join(root, controller)
                if not os.path.isdir(mount):
                    if controller == "pids":
                        continue
                    raise CgroupError(f"no cgroup v1 {controller} hierarchy at {mount}")
                base = os.path.join(mount, own.get(controller, "/").lstrip("/"), GROUP)
                os.makedirs(base, exist_ok=True)
                bases[controller] = base
            cg = Cgroups(1, bases)
    except (OSError, CgroupError, ValueError) as e:
        return None, f"no cgroups: {e}"
    return cg, cg.describe()
