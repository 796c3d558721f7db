"""
Real networks for the tests and benchmarks that need one: Linux network
namespaces joined by veth links, routers that forward, and home routers
with a NAT of a chosen kind (iptables).  Needs root, iproute2 and iptables.

    net = Network("nb-1234-")       # every namespace's name starts so
    try:
        internet = net.namespace("pub", forwarding=True)
        home = net.namespace("home")
        internetIP, homeIP = net.link(internet, home, "10.250.1")
        ...
    finally:
        net.down()                  # every namespace made, and what runs in it

The kinds of NAT a router may do (L{NAT_KINDS}), as Linux does them:

    cone        MASQUERADE: the source port is kept where it is free, so one
                local port gets one public port for every destination
    restricted  cone, and the router's own firewall: only what belongs to a
                connection started from inside comes in from the WAN, the
                rest is dropped unanswered (to the router and through it)
    symmetric   MASQUERADE --random-fully: a new random public port for every
                destination
"""

import collections
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
#: The user-space delayed link (this kernel has no sch_netem).
DELAY_LINK = os.path.join(HERE, "integration", "delaylink.py")

NAT_KINDS = ("cone", "restricted", "symmetric")

#: A home behind a NAT: its namespace and address, its router's namespace,
#: the router's public address, and the internet's end of the router's link.
Home = collections.namedtuple("Home", "ns address router wanIP gateway")


class NetworkError(Exception):
    """A command that builds the network failed (its standard error says why)."""


def run(*argv, check=True, timeout=30):
    """Run a command; NetworkError with its standard error when it fails and C{check}."""
    argv = [str(a) for a in argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise NetworkError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def natRules(kind, wan):
    """The iptables commands (argument lists) of a NAT of C{kind} out of device C{wan}."""
    if kind not in NAT_KINDS:
        raise ValueError(f"unknown NAT kind {kind!r} (choose from {', '.join(NAT_KINDS)})")
    masquerade = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", wan, "-j", "MASQUERADE"]
    if kind == "symmetric":
        return [masquerade + ["--random-fully"]]
    rules = [masquerade]
    if kind == "restricted":
        for chain in ("INPUT", "FORWARD"):
            rules.append(["iptables", "-A", chain, "-i", wan, "-m", "conntrack",
                          "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"])
            rules.append(["iptables", "-A", chain, "-i", wan, "-j", "DROP"])
    return rules


class Network:
    """
    The namespaces made by one test or benchmark, their names all starting
    with C{prefix}, and the links between them.  L{down} removes them all,
    which also ends every process still running in them.
    """

    def __init__(self, prefix):
        self.prefix = prefix
        self.namespaces = []
        self.forwarders = []
        self._devices = 0

    def namespace(self, name, forwarding=False):
        """A new namespace (its full name is returned), loopback up."""
        ns = self.prefix + name
        run("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        if forwarding:
            self.sysctl(ns, "net.ipv4.ip_forward=1")
        return ns

    def sysctl(self, ns, setting):
        run(*self.exec(ns, "sysctl", "-qw", setting))

    def exec(self, ns, *argv):
        """The command line that runs C{argv} in C{ns}."""
        return ["ip", "netns", "exec", ns, *map(str, argv)]

    def link(self, a, b, subnet, delay=0):
        """
        A veth link from namespace C{a} to C{b} on C{subnet} (the first
        three numbers of a /24): C{a} gets .1, C{b} .2.  With a C{delay}
        (milliseconds each way) the link is two TAP devices joined by
        test/integration/delaylink.py running in C{a} (this kernel has no
        netem), else a veth pair.  Returns both addresses; the device names
        are in L{devices}.
        """
        self._devices += 1
        devA, devB = self.devices()
        if delay:
            self._delayed(a, b, devA, devB, delay / 1000)
        else:
            run("ip", "-n", a, "link", "add", devA, "type", "veth", "peer", "name", devB,
                "netns", b)
        for ns, dev, ip in ((a, devA, f"{subnet}.1"), (b, devB, f"{subnet}.2")):
            run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
        return f"{subnet}.1", f"{subnet}.2"

    def _delayed(self, a, b, devA, devB, seconds):
        forwarder = subprocess.Popen(
            self.exec(a, sys.executable, DELAY_LINK, devA, devB, seconds, 0, seconds, 0),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.forwarders.append(forwarder)
        said = forwarder.stdout.readline()
        if said.strip() != b"ready":
            raise NetworkError(f"delaylink.py did not start: {said + forwarder.stdout.read()!r}")
        run("ip", "-n", a, "link", "set", devB, "netns", b)

    def devices(self, n=None):
        """The two device names of link C{n} (default: the latest made)."""
        n = self._devices if n is None else n
        return f"v{n}a", f"v{n}b"

    def route(self, ns, via, to="default"):
        run("ip", "-n", ns, "route", "add", to, "via", via)

    def nat(self, router, kind, wan):
        """Make C{router} forward and do a NAT of C{kind} out of its device C{wan}."""
        self.sysctl(router, "net.ipv4.ip_forward=1")
        for rule in natRules(kind, wan):
            run(*self.exec(router, *rule))

    def down(self):
        """Remove every namespace made here (a missing one is not an error)."""
        for forwarder in self.forwarders:
            forwarder.kill()
            forwarder.wait()
            forwarder.stdout.close()
        self.forwarders = []
        for ns in reversed(self.namespaces):
            pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ValueError, OSError):
                    pass
            run("ip", "netns", "del", ns, check=False)
        self.namespaces = []


class ProcessesInNamespaces:
    """
    A test's network: its namespaces (prefixed with C{prefix}) and the
    processes it starts in them through C{processes} (the integration
    tests' L{Processes}); L{down} ends both.  Subclasses build the network
    in C{up}.
    """

    def __init__(self, processes, prefix):
        self.processes = processes
        self.net = Network(prefix)

    def down(self):
        self.processes.stopAll()
        self.net.down()

    def start(self, ns, name, argv):
        return self.processes.start(name, self.net.exec(ns, *argv))


def running(lab):
    """A fixture's body: C{lab} up for the test, down after it however it ends."""
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


class Internet:
    """
    A "public" namespace that routes between everything attached to it (the
    internet), with its own address L{address} on its loopback, and the
    hosts and homes attached to it, each on its own /24 of 10.250.0.0/16 by
    an access link C{delay} milliseconds long each way (so two homes are
    twice that apart, one way).
    """

    def __init__(self, net, name="pub", delay=0):
        self.net = net
        self.delay = delay
        self.public = net.namespace(name, forwarding=True)
        self.address = "10.250.0.1"
        run("ip", "-n", self.public, "addr", "add", f"{self.address}/32", "dev", "lo")
        self._subnets = 0

    def _subnet(self):
        self._subnets += 1
        return self._subnets

    def host(self, name):
        """A namespace with a public address, straight on the internet: (ns, address)."""
        ns = self.net.namespace(name)
        gateway, address = self.net.link(self.public, ns, f"10.250.{self._subnet()}",
                                         self.delay)
        self.net.route(ns, gateway)
        return ns, address

    def home(self, name, kind):
        """
        A home behind a router with a NAT of C{kind} (L{NAT_KINDS}), as a
        L{Home}.
        """
        k = self._subnet()
        router = self.net.namespace(f"{name}-rtr")
        home = self.net.namespace(name)
        gateway, wanIP = self.net.link(self.public, router, f"10.250.{k}", self.delay)
        wan = self.net.devices()[1]
        self.net.route(router, gateway)
        lanGateway, homeIP = self.net.link(router, home, f"192.168.{k}")
        self.net.route(home, lanGateway)
        self.net.nat(router, kind, wan)
        return Home(home, homeIP, router, wanIP, gateway)
