"""
twistd cpushare-seller: rent out this computer's idle CPU time.

    twistd -n cpushare-seller --home H --cores N --memory MB

Keeps one outbound connection to the market (no inbound port), announces
the capacity on offer, and reconnects by itself when the connection drops.
"""

import os

from twisted.logger import Logger
from twisted.python import usage

from cpushare.client.options import ClientOptions

log = Logger()


def physicalMemoryMB():
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)


class Options(ClientOptions):
    synopsis = "[--home H] [--cores N] [--memory MB]"
    longdesc = "Sell this computer's idle CPU time on the CPUShare market."
    optParameters = [
        ["cores", None, None, "Cores to offer (default: all of them).", int],
        ["memory", None, None, "Memory to offer in MB (default: half of this computer's).", int],
    ]

    def postOptions(self):
        ClientOptions.postOptions(self)
        if self["cores"] is None:
            self["cores"] = os.cpu_count() or 1
        if self["memory"] is None:
            self["memory"] = physicalMemoryMB() // 2
        if self["cores"] < 1:
            raise usage.UsageError("--cores must be at least 1")
        if self["memory"] < 64:
            raise usage.UsageError("--memory must be at least 64 (MB)")


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from cpushare.client.service import MarketConnection
    from cpushare.client.session import homeEndpoint
    from cpushare.protocol.commands import Offer

    cores, memory = options["cores"], options["memory"]

    def offer(session):
        log.info("offering {cores} cores and {memory} MB", cores=cores, memory=memory)
        return session.control.callRemote(Offer, cores=cores, memory=memory)

    return MarketConnection(
        reactor, homeEndpoint(reactor, options.home), "seller", onSession=offer,
        where=f"{options.host}:{options.port}",
    )
