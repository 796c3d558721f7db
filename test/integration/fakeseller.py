"""
A seller program without QEMU, for the billing tests: the market cannot
tell it from the real one on the wire.

It connects with the real client code (MarketConnection: reconnection with
back-off), offers CORES cores at PRICE, answers StartVM by reporting the VM
running, and reports every VM's CPU seconds growing at RATE CPU seconds a
second per core, every 0.2 s (the real seller reports its VMs' cgroups
every 10 s).  Its VMs survive losing the market: on reconnecting it offers
again and reattaches them (ReattachVMs).  A stopped VM's last CPU seconds
are reported with its final state, as the real seller does.  Each VM
prints a line on its console when it starts, as a booting VM does (the
market bills a VM from its first sign of life), unless --silent: a
seller that fakes VMs.  With --flood, each VM pushes junk frames at the
buyer's network as fast as the connection takes them; --net-fee sets the
fee a GB it asks (micro-units).

    python fakeseller.py HOME CORES PRICE [RATE] [--silent] [--flood] [--net-fee F]

It prints one line for each thing it does, for the test to wait on.
"""

import argparse
import sys

from twisted.internet import defer, task
from twisted.internet.task import LoopingCall

from cpushare.client.home import Home
from cpushare.client.service import MarketConnection
from cpushare.client.session import ClientControl, ClientSession, homeEndpoint
from cpushare.protocol import commands
from cpushare.protocol.commands import consoleChannel, nicChannel

JUNK = b"\xff" * 6 + b"\x02" + b"\x00" * 1493


def say(text):
    print(text, flush=True)


class FakeVMs:
    def __init__(self, reactor, cores, rate, silent=False, flood=False):
        self.reactor = reactor
        self.cores = cores
        self.rate = rate
        self.silent = silent
        self.flood = flood
        self.vms = {}               # vm id -> (started, cores)
        self.session = None
        self.flooded = 0

    def showLife(self, vmId):
        session = self.session
        if not self.silent and session is not None and session.connected:
            session.sendFrame(consoleChannel(vmId), b"fake VM %d booted\r\n" % vmId)

    def pump(self):
        """Junk frames from every VM, a batch each time: the seller's queue drops the rest."""
        session = self.session
        if not self.flood or session is None or not session.connected:
            return
        for vmId in list(self.vms):
            for _ in range(64):
                if session.sendFrame(nicChannel(vmId), JUNK):
                    self.flooded += len(JUNK)

    def cpu(self, vmId):
        started, cores = self.vms[vmId]
        return (self.reactor.seconds() - started) * cores * self.rate

    def report(self):
        session = self.session
        if session is None or not session.connected:
            return
        for vmId in list(self.vms):
            session.control.callRemote(
                commands.VMState, vm=vmId, state="running", cpu_seconds=self.cpu(vmId),
            ).addErrback(lambda f: None)


class FakeSellerControl(ClientControl):
    @commands.StartVM.responder
    def startVM(self, vm, image, size, cores, memory, mac):
        vms = self.session.fake
        vms.vms[vm] = (vms.reactor.seconds(), cores)
        say(f"started VM {vm}")
        vms.reactor.callLater(0, vms.report)
        vms.reactor.callLater(0, vms.showLife, vm)
        return {}

    @commands.StopVM.responder
    def stopVM(self, vm):
        vms = self.session.fake
        if vm not in vms.vms:
            raise commands.NoSuchVM(f"VM {vm} is not running here")
        cpu = vms.cpu(vm)
        del vms.vms[vm]
        say(f"stopped VM {vm} after {cpu:.1f} CPU seconds"
            + (f" ({vms.flooded} bytes of junk sent)" if vms.flood else ""))
        vms.reactor.callLater(0, lambda: self.callRemote(
            commands.VMState, vm=vm, state="stopped", cpu_seconds=cpu,
            reason="stopped by the market").addErrback(lambda f: None))
        return {}


class FakeSellerSession(ClientSession):
    controlClass = FakeSellerControl

    def __init__(self, *a, fake=None, **kw):
        ClientSession.__init__(self, *a, **kw)
        self.fake = fake


def parse(argv):
    p = argparse.ArgumentParser(prog="fakeseller.py")
    p.add_argument("home")
    p.add_argument("cores", type=int)
    p.add_argument("price", type=int)
    p.add_argument("rate", type=float, nargs="?", default=0.9)
    p.add_argument("--silent", action="store_true")
    p.add_argument("--flood", action="store_true")
    p.add_argument("--net-fee", type=int, default=None)
    return p.parse_args(argv)


async def main(reactor, argv):
    args = parse(argv)
    fake = FakeVMs(reactor, args.cores, args.rate, silent=args.silent, flood=args.flood)
    home = Home(args.home)
    terms = {"price": args.price}
    if args.net_fee is not None:
        terms["net_fee"] = args.net_fee

    async def serve(session):
        fake.session = session
        await session.control.callRemote(commands.Offer, cores=fake.cores, memory=4096,
                                          **terms)
        say("offering")
        if fake.vms:
            answer = await session.control.callRemote(commands.ReattachVMs,
                                                      vms=sorted(fake.vms))
            for vmId in set(fake.vms) - set(answer["keep"]):
                del fake.vms[vmId]
            say(f"reattached {sorted(answer['keep'])}")

    connection = MarketConnection(
        reactor, homeEndpoint(reactor, home), "seller",
        onSession=lambda session: defer.ensureDeferred(serve(session)),
        sessionClass=FakeSellerSession, sessionKw={"fake": fake})
    connection.startService()
    LoopingCall(fake.report).start(0.2, now=False)
    if fake.flood:
        LoopingCall(fake.pump).start(0.005, now=False)
    await defer.Deferred()      # until killed


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1:])))
