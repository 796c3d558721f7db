"""
A seller whose trusted computing cheats, for tests only (never a product
option): the seller's twistd plugin, with --tpm on a real software TPM, in a
process whose answers to the market's Attest are made up in one way, named
by the environment's CPUSHARE_TPM_CHEAT:

  old-nonce      quotes a nonce of its own, not the market's: what a replayed
                 quote (made earlier, for another nonce) is
  other-tpm:S    answers with a quote of another TPM (swtpm spec S) that it
                 measured as an honest seller would
  client         measures a client digest other than its code's (a changed client)
  eventlog       sends an event log that does not replay (an event's "what"
                 changed after it was extended)

    CPUSHARE_TPM_CHEAT=MODE python cheatingtpmseller.py -n --pidfile= cpushare-seller ...

takes twistd's arguments; L{TWISTD} is the command to put before them.
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWISTD = [sys.executable, os.path.abspath(__file__)]
OLD_NONCE = b"an old nonce, not the market's"


def cheat(mode):
    """Make L{TrustedSeller} answer Attest as C{mode} says."""
    from cpushare.attest.tpm import TPMService
    from cpushare.client.seller import trusted

    honest = trusted.TrustedSeller.attest

    async def attest(self, nonce, vm=None, image=None):
        if mode == "old-nonce":
            return await honest(self, OLD_NONCE, vm, image)
        answer = await honest(self, nonce, vm, image)
        if mode == "eventlog":
            events = json.loads(answer["events"])
            qemu = next(e for e in events if e["kind"] == "qemu")
            qemu["what"] = "qemu-system-x86_64 (not what was extended)"
            answer["events"] = json.dumps(events).encode()
        elif mode.startswith("other-tpm:"):
            other = getattr(self, "otherTPM", None)
            if other is None:
                home = os.path.join(self.home, "other-tpm")
                os.makedirs(home, exist_ok=True)
                other = self.otherTPM = TPMService(self.reactor, mode.split(":", 1)[1], home)
                await other.attestationKey()
                client, qemu = await self.digests()
                await other.measure("client", client, "cpushare")
                await other.measure("qemu", qemu, os.path.basename(self.qemu))
            answer = trusted.encodeQuote(await other.quote(nonce))
        return answer

    trusted.TrustedSeller.attest = attest
    if mode == "client":
        trusted.packageDigest = lambda root=None: "c" * 64


def main(argv):
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, ROOT)
    mode = os.environ["CPUSHARE_TPM_CHEAT"]
    cheat(mode)
    print(f"cheatingtpmseller.py: this seller's TPM answers cheat ({mode})", flush=True)
    from twisted.scripts.twistd import run
    sys.argv = ["twistd"] + argv
    run()


if __name__ == "__main__":
    main(sys.argv[1:])
