"""
The seller's TPM (twistd cpushare-seller --tpm DEVICE): enrolment with the
market, and the quotes and keys the market asks for trusted leases.

The one module of the seller that calls the TPM library
(L{cpushare.attest.tpm}, whose L{TPMService} runs each TPM command on a
thread of its own, so the reactor never waits for the TPM).

On each connection the seller enrols: it sends its endorsement key's
certificate and public key and its attestation key (made once, kept in the
home folder), answers the market's challenge with ActivateCredential, and
is told when its key was enrolled before (nothing more to do).

Before a quote the seller measures, into the PCR its client extends
(CLIENT_PCR), what runs the buyer's VM: its own code (the digest of the
installed cpushare package's files), the QEMU program it runs, and for a
lease the buyer's image (its sha256, which the image cache checks every
image against).  Each is measured once while the PCR holds it; the PCR is
reset (and the log begun again) at a seller-wide attestation when no VM
runs (and before the first quote: the PCR may hold what an earlier run
of the seller extended), so the log stays small and replays.

An encrypted image's key reaches the VM host through L{TrustedSeller.imageKey}
(the host's C{imageKey}): the market releases it (ReleaseKey) before it
sends StartVM, so a key unwrapped by the TPM waits here, in memory only,
until the VM asks for it, or is dropped after C{keyTimeout} seconds; a VM
that asks for a key the market never releases fails after C{keyTimeout}
seconds, with the reason.

Run as a program, this module prints what an operator must allow in the
market's policy for this seller (`cpushare-admin tpm-policy add ...`):

    python -m cpushare.client.seller.trusted [--qemu PATH]
"""

import hashlib
import json
import os

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

import cpushare
from cpushare.protocol import commands
from cpushare.protocol.commands import BadRequest

# Bindings kept for VMs whose image key has not come yet, at most (and
# released keys waiting for their VM, at most).
MAX_BINDINGS = 64
# Seconds a released image key waits for its VM, and a VM for its key.
KEY_TIMEOUT = 600.0


class NoImageKey(Exception):
    """A VM's encrypted image has no key on this seller: the reason."""


def fileDigest(path):
    """The sha256 (hex) of the file at C{path}, read a chunk at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def packageDigest(root=None):
    """
    The digest of the installed cpushare package: sha256 over each file's
    path (relative, sorted) and sha256, compiled caches left out.
    """
    root = root or os.path.dirname(os.path.abspath(cpushare.__file__))
    entries = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in files:
            if name.endswith((".pyc", ".pyo")):
                continue
            path = os.path.join(folder, name)
            entries.append((os.path.relpath(path, root), fileDigest(path)))
    h = hashlib.sha256()
    for rel, digest in sorted(entries):
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def encodeQuote(quote):
    """A quote dict (see cpushare.attest.evidence.verifyQuote) as Attest's answer."""
    answer = {
        "attest": quote["attest"], "signature": quote["signature"],
        "pcrs": json.dumps({str(k): v.hex() for k, v in sorted(quote["pcrs"].items())}).encode(),
        "events": json.dumps(quote["events"], sort_keys=True, separators=(",", ":")).encode(),
    }
    if len(answer["events"]) > commands.EVIDENCE_MAX:
        raise BadRequest(f"the event log is larger than {commands.EVIDENCE_MAX} bytes")
    return answer


def openTPM(reactor, spec, home, eventLog=None):
    """
    The TPM of C{spec} (a device or an swtpm socket) as a TPMService;
    C{eventLog}: the TCG event log of its boot chain (a device's is found by
    itself; a software TPM's is a file its tests write).
    """
    from cpushare.attest.tpm import TPMService
    return TPMService(reactor, spec, home, eventLog=eventLog)


class TrustedSeller:
    """
    The seller's side of trusted computing.  C{tpm} is a TPMService
    (L{cpushare.attest.tpm}: its methods fire Deferreds); C{running()} says
    how many VMs run; C{onImageKey(vm, key)} takes an encrypted image's key.
    """

    log = Logger()

    def __init__(self, reactor, tpm, home, qemu, running=lambda: 0, onImageKey=None,
                 keyTimeout=KEY_TIMEOUT):
        self.reactor = reactor
        self.tpm = tpm
        self.home = home
        self.qemu = qemu
        self.running = running
        self.onImageKey = onImageKey
        self.keyTimeout = keyTimeout
        self.measured = None        # (kind, digest) in the PCR now; None: not reset yet
        self.bindings = {}          # vm id -> its binding key (BindingKey's answer)
        self.released = {}          # vm id -> (its image key, the call that drops it)
        self.waiting = {}           # vm id -> the Deferred of its image key
        self._digests = None

    def _inThread(self, fn, *args):
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

    async def digests(self):
        """(the client's digest, QEMU's digest), computed once, off the reactor."""
        if self._digests is None:
            client = await self._inThread(packageDigest)
            qemu = await self._inThread(fileDigest, os.path.realpath(self.qemu))
            self._digests = (client, qemu)
            self.log.info("trusted computing: client digest {client}, QEMU {qemu}",
                          client=client, qemu=qemu)
        return self._digests

    async def enrol(self, session):
        """Enrol this seller's TPM with the market of C{session}."""
        ekCert, ekPublic = await self.tpm.endorsement()
        akPublic = await self.tpm.attestationKey()
        answer = await session.control.callRemote(
            commands.EnrolTPM, ek_cert=ekCert, ek_public=ekPublic, ak_public=akPublic)
        if answer["enrolled"]:
            self.log.info("trusted computing: this TPM's attestation key is enrolled")
            return
        secret = await self.tpm.activate({"credential_blob": answer["credential_blob"],
                                          "encrypted_secret": answer["encrypted_secret"]})
        await session.control.callRemote(commands.ActivateTPM, secret=secret)
        self.log.info("trusted computing: enrolled this TPM's attestation key")

    async def _measure(self, kind, digest, what):
        if (kind, digest) not in self.measured:
            await self.tpm.measure(kind, digest, what)
            self.measured.add((kind, digest))

    async def attest(self, nonce, vm=None, image=None):
        """Attest's answer: measure what runs the VM (and C{image}), then quote C{nonce}."""
        if not 16 <= len(nonce) <= 64:
            raise BadRequest("Attest: a nonce is 16 to 64 bytes")
        if self.measured is None or (vm is None and self.measured and not self.busy()):
            # What an earlier run extended is not in this log: begin again.
            await self.tpm.resetClientPCR()
            self.measured = set()
        client, qemu = await self.digests()
        await self._measure("client", client, "cpushare")
        await self._measure("qemu", qemu, os.path.basename(self.qemu))
        if image is not None:
            await self._measure("image", image, f"vm {vm}")
        return encodeQuote(await self.tpm.quote(nonce))

    async def bindingKey(self, vm, nonce, pcrs):
        """BindingKey's answer: a key usable only in the PCR state C{pcrs} (JSON)."""
        try:
            values = {int(k): bytes.fromhex(v) for k, v in json.loads(pcrs).items()}
        except (ValueError, TypeError, AttributeError):
            raise BadRequest("BindingKey: pcrs is not a JSON object of hex digests") from None
        binding = await self.tpm.bindingKey(nonce, values)
        if len(self.bindings) >= MAX_BINDINGS:
            self.bindings.pop(next(iter(self.bindings)))
        self.bindings[vm] = binding
        return {"public": binding["public"], "certify": binding["certify"],
                "signature": binding["signature"]}

    async def releaseKey(self, vm, wrapped):
        """ReleaseKey: unwrap VM C{vm}'s image key in the TPM and hand it on."""
        binding = self.bindings.pop(vm, None)
        if binding is None:
            raise BadRequest(f"ReleaseKey: no binding key was made for VM {vm}")
        key = await self.tpm.unwrap(binding, wrapped)
        self.keyReleased(vm, key)
        if self.onImageKey is not None:
            self.onImageKey(vm, key)

    def busy(self):
        """Whether a VM runs or waits for its image key (its PCR state is in use)."""
        return bool(self.running() or self.released or self.waiting)

    def keyReleased(self, vm, key):
        """VM C{vm}'s image key came: to the VM waiting for it, else kept a while for it."""
        d = self.waiting.pop(vm, None)
        if d is not None:
            d.callback(key)
            return
        old = self.released.pop(vm, None)
        if old is not None and old[1].active():
            old[1].cancel()
        while len(self.released) >= MAX_BINDINGS:
            _, call = self.released.pop(next(iter(self.released)))
            if call.active():
                call.cancel()
        drop = self.reactor.callLater(self.keyTimeout, self.released.pop, vm, None)
        self.released[vm] = (key, drop)

    def imageKey(self, vm):
        """
        A Deferred of the key of VM C{vm}'s encrypted image (the VM host's
        C{imageKey}): the key released for it, now or within C{keyTimeout}
        seconds; else it fails with L{NoImageKey}, the reason.
        """
        vmId = vm.id
        kept = self.released.pop(vmId, None)
        if kept is not None:
            if kept[1].active():
                kept[1].cancel()
            return defer.succeed(kept[0])
        if vmId in self.waiting or len(self.waiting) >= MAX_BINDINGS:
            return defer.fail(NoImageKey(f"VM {vmId}'s image key is awaited already, or too many"
                                         " keys are"))
        d = defer.Deferred()
        self.waiting[vmId] = d

        def late():
            if self.waiting.get(vmId) is d:
                del self.waiting[vmId]
                d.errback(NoImageKey(
                    f"the market released no key for VM {vmId}'s encrypted image within"
                    f" {self.keyTimeout:g}s (its seller's TPM was not attested for it)"))

        call = self.reactor.callLater(self.keyTimeout, late)

        def done(result):
            if call.active():
                call.cancel()
            return result

        return d.addBoth(done)


def responder(session, method, *args):
    """Call C{method} of C{session}'s TrustedSeller, or refuse: it has no TPM."""
    trusted = getattr(session, "trusted", None)
    if trusted is None:
        raise BadRequest("this seller has no TPM (it was not started with --tpm)")

    def named(failure):
        # The TPM's refusals (EvidenceError, TPMError) reach the market by their reason.
        if getattr(failure.value, "kind", None) is not None and not failure.check(BadRequest):
            raise BadRequest(str(failure.value)[:500])
        return failure

    return defer.ensureDeferred(getattr(trusted, method)(*args)).addErrback(named)


def measurements(qemu):
    """The `cpushare-admin tpm-policy add` lines that let this seller's client and C{qemu} pass."""
    return [f"cpushare-admin tpm-policy add client {packageDigest()}",
            f"cpushare-admin tpm-policy add qemu {fileDigest(os.path.realpath(qemu))}"]


def main(argv=None):
    """Print what the operator must allow for this seller (see the module)."""
    import argparse
    import shutil
    parser = argparse.ArgumentParser(
        prog="python -m cpushare.client.seller.trusted",
        description="Print the digests this seller's client measures into its TPM, as the"
                    " lines the market's operator runs to allow them.")
    parser.add_argument("--qemu", default=shutil.which("qemu-system-x86_64"),
                        help="the QEMU program the seller runs (default: found on PATH)")
    args = parser.parse_args(argv)
    if not args.qemu or not os.path.isfile(args.qemu):
        parser.error("no QEMU program: name it with --qemu")
    print("\n".join(measurements(args.qemu)))


if __name__ == "__main__":
    main()
