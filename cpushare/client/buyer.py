"""
twistd cpushare-buyer: the buyer's end of the market.

    twistd -n cpushare-buyer --home H

Keeps one outbound connection to the market and reconnects by itself when
it drops.  (The buyer's virtual ethernet switch joins it in a later step.)
"""

from cpushare.client.options import ClientOptions


class Options(ClientOptions):
    synopsis = "[--home H]"
    longdesc = "Run VMs on the CPUShare market."


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    from cpushare.client.service import MarketConnection
    from cpushare.client.session import homeEndpoint

    return MarketConnection(
        reactor, homeEndpoint(reactor, options.home), "buyer",
        where=f"{options.host}:{options.port}",
    )
