"""
A seller program without QEMU, for the billing tests: the market cannot
tell it from the real one on the wire.

It connects with the real client code (MarketConnection: reconnection with
back-off), offers CORES cores at PRICE, answers StartVM by reporting the VM
running, and reports every VM's CPU seconds growing at RATE CPU seconds a
second per core, every 0.2 s (the real seller reports its VMs' cgroups
every 10 s).  Its VMs survive losing the market: on reconnecting it offers
again and reattaches them (ReattachVMs).  A stopped VM's last CPU seconds
are reported with its final state, as the real seller does.

    python fakeseller.py HOME CORES PRICE [RATE]

It prints one line for each thing it does, for the test to wait on.
"""

import sys

from twisted.internet import defer, task
from twisted.internet.task import LoopingCall

from cpushare.client.home import Home
from cpushare.client.service import MarketConnection
from cpushare.client.session import ClientControl, ClientSession, homeEndpoint
from cpushare.protocol import commands


def say(text):
    print(text, flush=True)


class FakeVMs:
    def __init__(self, reactor, cores, rate):
        self.reactor = reactor
        self.cores = cores
        self.rate = rate
        self.vms = {}               # vm id -> (started, cores)
        self.session = None

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
        return {}

    @commands.StopVM.responder
    def stopVM(self, vm):
        vms = self.session.fake
        if vm not in vms.vms:
            raise commands.NoSuchVM(f"VM {vm} is not running here")
        cpu = vms.cpu(vm)
        del vms.vms[vm]
        say(f"stopped VM {vm} after {cpu:.1f} CPU seconds")
        vms.reactor.callLater(0, lambda: self.callRemote(
            commands.VMState, vm=vm, state="stopped", cpu_seconds=cpu,
            reason="stopped by the market").addErrback(lambda f: None))
        return {}


class FakeSellerSession(ClientSession):
    controlClass = FakeSellerControl

    def __init__(self, *a, fake=None, **kw):
        ClientSession.__init__(self, *a, **kw)
        self.fake = fake


async def main(reactor, home, cores, price, rate="0.9"):
    fake = FakeVMs(reactor, int(cores), float(rate))
    home = Home(home)

    async def serve(session):
        fake.session = session
        await session.control.callRemote(commands.Offer, cores=fake.cores, memory=4096,
                                         price=int(price))
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
    await defer.Deferred()      # until killed


if __name__ == "__main__":
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, *sys.argv[1:])))
