"""
The seller's UDP port for direct paths, and how it learns its public address.

On each connection to the market the seller asks for a token (MeshToken),
sends it from its UDP port to the market's (L{cpushare.mesh.reflect}), again
after L{ANSWER_TIMEOUT} seconds up to L{TRIES} times when nothing comes back,
and hears the address and port the market saw: its public address, after any
NAT.  It then tells the market its candidates (MeshCandidates): that public
address and its local address with the bound port.  Every other datagram
goes to the direct paths' L{cpushare.mesh.path.Mesh}
(L{cpushare.client.seller.meshswitch}).
"""

import socket

from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from cpushare.mesh import reflect
from cpushare.protocol import commands

TRIES = 4
ANSWER_TIMEOUT = 2.0


class MeshPort(DatagramProtocol):
    """
    The seller's UDP port.  C{given}: its number was given with --udp-port
    (an open port), rather than picked by the system (hole punching only).
    """

    log = Logger()

    def __init__(self, reactor, given=False):
        self.reactor = reactor
        self.given = given
        self.public = None          # (host, port) as the market saw it
        self.candidates = []
        self.ignored = 0            # datagrams that answered no request of ours
        self.mesh = None            # the direct paths' L{cpushare.mesh.path.Mesh}, if any
        self._waiting = None        # (token, market address, Deferred)

    def datagramReceived(self, data, addr):
        waiting = self._waiting
        parsed = None if waiting is None else reflect.parseAnswer(data)
        # The token says it is the market's answer: a market reached at an
        # address of another of its interfaces answers from the one that
        # leads back here.
        if waiting is None or parsed is None or parsed[0] != waiting[0]:
            if self.mesh is not None:
                # A peer's datagram, or nothing: the mesh opens it or drops it.
                self.mesh.datagramReceived(data, tuple(addr[:2]))
            else:
                self.ignored += 1
            return
        self._waiting = None
        waiting[2].callback(parsed[1:])

    async def discover(self, session, marketHost):
        """
        Learn the public address over C{session} and the market's UDP port
        at C{marketHost}, then give the market the candidates.  Fires with
        the public (host, port), or None when the market has no UDP port or
        never answered (both logged).
        """
        try:
            given = await session.control.callRemote(commands.MeshToken)
        except commands.BadRequest as e:
            self.log.info("mesh: no direct paths: {why}", why=str(e))
            return None
        try:
            ip = str(reflect.publicAddress(marketHost))
        except ValueError:
            ip = await self.reactor.resolve(marketHost)
        market = (ip, given["udp_port"])
        public = await self._ask(given["token"], market)
        if public is None:
            self.log.warn(
                "mesh: the market's UDP port {host}:{port} did not answer {tries} requests"
                " ({timeout:.0f}s apart): no direct paths until the next connection",
                host=ip, port=market[1], tries=TRIES, timeout=ANSWER_TIMEOUT)
            return None
        self.public = public
        local = self.transport.getHost()
        self.log.info(
            "mesh: public address {host}:{port} (UDP port {local}, {how})",
            host=public[0], port=public[1], local=local.port,
            how="open, given with --udp-port" if self.given
            else "ephemeral: direct paths by hole punching only")
        candidates = [public] + [(address, local.port)
                                 for address in localAddresses(local.host, ip)]
        candidates = reflect.checkCandidates(list(dict.fromkeys(candidates))
                                             [:reflect.MAX_CANDIDATES])
        try:
            await session.control.callRemote(
                commands.MeshCandidates,
                candidates=[{"host": host, "port": port} for host, port in candidates])
        except commands.BadRequest as e:
            self.log.error("mesh: the market refused the candidates: {why}", why=str(e))
            return public
        self.candidates = candidates
        self.log.info("mesh: candidates given to the market: {candidates}",
                      candidates=", ".join(f"{h}:{p}" for h, p in candidates))
        return public

    async def _ask(self, token, market):
        for _ in range(TRIES):
            d = defer.Deferred()
            self._waiting = (token, market, d)
            try:
                self.transport.write(reflect.request(token), market)
            except OSError as e:
                self.log.info("mesh: sending to the market's UDP port: {why}", why=e)
            d.addTimeout(ANSWER_TIMEOUT, self.reactor)
            try:
                return await d
            except defer.TimeoutError:
                continue
            finally:
                self._waiting = None
        return None


def localAddresses(bound, marketIP):
    """
    This computer's local addresses worth giving as candidates: the one the
    port is bound to, or (bound to all) the one its traffic to the market
    leaves from (a UDP connect only looks up the route; nothing is sent).
    """
    if bound not in ("", "0.0.0.0", "::"):
        return [bound]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((marketIP, 9))
            return [probe.getsockname()[0]]
    except OSError:
        return []
