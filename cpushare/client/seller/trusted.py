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

# Bindings kept for VMs whose image key has not come yet, at most.
MAX_BINDINGS = 64


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
        "events": json.dumps(quote["events"], sort_keys=True).encode(),
    }
    if len(answer["events"]) > commands.EVIDENCE_MAX:
        raise BadRequest(f"the event log is larger than {commands.EVIDENCE_MAX} bytes")
    return answer


def openTPM(reactor, spec, home):
    """The TPM of C{spec} (a device or an swtpm socket) as a TPMService."""
    from cpushare.attest.tpm import TPMService
    return TPMService(reactor, spec, home)


class TrustedSeller:
    """
    The seller's side of trusted computing.  C{tpm} is a TPMService
    (L{cpushare.attest.tpm}: its methods fire Deferreds); C{running()} says
    how many VMs run; C{onImageKey(vm, key)} takes an encrypted image's key.
    """

    log = Logger()

    def __init__(self, reactor, tpm, home, qemu, running=lambda: 0, onImageKey=None):
        self.reactor = reactor
        self.tpm = tpm
        self.home = home
        self.qemu = qemu
        self.running = running
        self.onImageKey = onImageKey
        self.measured = None        # (kind, digest) in the PCR now; None: not reset yet
        self.bindings = {}          # vm id -> its binding key (BindingKey's answer)
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
        akPublic = await self.tpm.attestationKey(self.home)
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
        if self.measured is None or (vm is None and not self.running() and self.measured):
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
        if self.onImageKey is not None:
            self.onImageKey(vm, key)


def responder(session, method, *args):
    """Call C{method} of C{session}'s TrustedSeller, or refuse: it has no TPM."""
    trusted = getattr(session, "trusted", None)
    if trusted is None:
        raise BadRequest("this seller has no TPM (it was not started with --tpm)")
    return defer.ensureDeferred(getattr(trusted, method)(*args))
