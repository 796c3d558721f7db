"""
A seller that lies to the market's measurements, for test_measured_link:
it connects with the real client code and offers capacity, but answers
heartbeats and bandwidth probes as a cheater would.

    python lyingseller.py HOME MODE

MODE is
  forge: every heartbeat is answered at once with a nonce of its own (and,
         to a market that sends one, a send time 100 s in the future), and
         every bandwidth probe at once with a digest and bytes of its own;
  slow:  answers honestly, but holds every heartbeat answer for 1 s, so a
         market that subtracted its round trip from the time a bandwidth
         measurement took would show a far higher bandwidth.

It prints "offering" once it has offered, for the test to wait on.
"""

import os
import sys

from twisted.internet import defer, task
from twisted.protocols import amp

from cpushare.client.home import Home
from cpushare.client.service import MarketConnection
from cpushare.client.session import ClientControl, ClientSession, homeEndpoint
from cpushare.protocol import commands

SLOW = 1.0


class LyingControl(ClientControl):
    mode = None

    def ampBoxReceived(self, box):
        command = box.get(amp.COMMAND)
        if command == b"Ping":
            self.ping(box)
        elif command == b"Probe" and self.mode == "forge":
            back = int(box.get(b"back", b"0"))
            self.answer(box, digest=os.urandom(32), data=b"\0" * back)
        else:
            ClientControl.ampBoxReceived(self, box)

    def answer(self, box, **values):
        answer = amp.AmpBox({amp.ANSWER: box[amp.ASK]})
        for key, value in values.items():
            answer[key.encode()] = value
        if self.transport is not None:
            self.sendBox(answer)

    def ping(self, box):
        if self.mode == "forge":
            values = {"nonce": os.urandom(16)}
            if b"sent" in box:
                values["sent"] = repr(float(box[b"sent"]) + 100.0).encode()
            self.answer(box, **values)
        else:
            echo = {k.decode(): v for k, v in box.items() if k in (b"sent", b"nonce")}
            self.session.reactor.callLater(SLOW, self.answer, box, **echo)


class LyingSession(ClientSession):
    controlClass = LyingControl

    def makeControl(self):
        control = LyingControl(self)
        control.mode = self.mode
        return control


async def main(reactor, home, mode):
    if mode not in ("forge", "slow"):
        raise SystemExit(f"unknown mode {mode!r}: forge or slow")
    LyingSession.mode = mode

    async def serve(session):
        await session.control.callRemote(commands.Offer, cores=1, memory=512)
        print("offering", flush=True)

    connection = MarketConnection(
        reactor, homeEndpoint(reactor, Home(home)), "seller",
        onSession=lambda session: defer.ensureDeferred(serve(session)),
        sessionClass=LyingSession)
    connection.startService()
    await defer.Deferred()      # until killed


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, *sys.argv[1:])))
