"""
The cost of trusted computing's evidence (docs/performance.md, "Attestation").

    .venv/bin/python bench/attest.py [--rounds N]

On a software TPM (swtpm, as the tests make it: test/swtpm.py), in this
process, in wall-clock milliseconds:

  enrolment     the seller's side (read the EK and its certificate, create
                the AK, activate the credential) and the market's
                (verifyEnrolment, makeChallenge, checkActivation)
  quote         TPM.quote over a fresh nonce (the seller's side: the TPM
                signs, the PCRs are read, the event log goes with it)
  verifyQuote   the market's check of that quote, in CPU time, against a
                baseline measured in the same run: one plain RSA-2048
                PKCS#1 v1.5 signature verification with `cryptography`
  binding       TPM.bindingKey (an RSA key created in the TPM and certified)
                and TPM.unwrap (PolicyPCR + RSA_Decrypt), and the market's
                verifyBindingKey + wrapSecret

And, in the same run, as the market sees it (the server's own Market,
Orders and Attestations with the real evidence library, on the real
reactor and a SQLite file, as bench/market.py runs them; the seller an
in-process stand-in of its connection whose answers come from the real
TrustedSeller on its own swtpm, through TPMService's thread, each command's
arguments and answer encoded and parsed as AMP does):

  lease attestation   Attest sent -> its quote verified against the policy
                      (the seller measures and quotes, the market reads the
                      policy and checks the quote on its thread pool)
  lease start         an order placed -> its StartVM sent: an untrusted lease,
                      a trusted one (a quote first) and a trusted one of an
                      encrypted image (a quote, a binding key made in the TPM
                      and checked, the key wrapped and unwrapped)

What it leaves out is the network: a real seller adds one round trip per
command (Attest; BindingKey and ReleaseKey for an encrypted image).

Results go to bench/results/attest.json.  Nothing here asserts a speed:
the exit status is non-zero only when a measurement could not be taken.
A hardware TPM is much slower than swtpm (RSA key creation takes seconds
there); these figures are the software's own cost.
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import stats  # noqa: E402
from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import padding, rsa  # noqa: E402

from cpushare.attest import evidence, tpm as tpmlib  # noqa: E402
from cpushare.attest.eventlog import parseTCG  # noqa: E402
from test.swtpm import SoftwareTPMs  # noqa: E402

CLIENT, QEMU, IMAGE = "a" * 64, "b" * 64, "c" * 64


def log(text):
    print(f"[attest] {text}", flush=True)


def ms(seconds):
    return [s * 1000 for s in seconds]


def timed(fn, clock=time.perf_counter):
    t0 = clock()
    result = fn()
    return clock() - t0, result


def enrol(software, home, ca):
    """(seller's seconds, market's seconds, the open TPM, the AK) of one enrolment."""
    os.makedirs(home)
    seller = market = 0.0
    t, tpm = timed(lambda: tpmlib.open(software.spec, eventLog=software.eventLog))
    seller += t
    t, (cert, ekPublic) = timed(tpm.endorsement)
    seller += t
    t, akPublic = timed(lambda: tpm.attestationKey(home))
    seller += t
    t, akName = timed(lambda: evidence.verifyEnrolment(cert, ekPublic, akPublic, [ca]))
    market += t
    t, (challenge, secret) = timed(lambda: evidence.makeChallenge(ekPublic, akName))
    market += t
    t, answer = timed(lambda: tpm.activate(challenge))
    seller += t
    t, _ = timed(lambda: evidence.checkActivation(secret, answer))
    market += t
    return seller, market, tpm, akPublic


def cpuEach(fn, rounds):
    """CPU seconds of each of C{rounds} calls of C{fn}, measured over batches of 20 (process_time is coarse)."""
    batch = 20
    out = []
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(batch):
            fn()
        out.append((time.process_time() - t0) / batch)
    return out


def measure(folder, rounds):
    swtpms = SoftwareTPMs(folder)
    try:
        sellerSide, marketSide = [], []
        for i in range(max(1, rounds // 10)):
            software = swtpms.make()
            seller, market, tpm, akPublic = enrol(software, os.path.join(folder, f"home{i}"), swtpms.ca)
            sellerSide.append(seller)
            marketSide.append(market)
        for kind, digest in (("client", CLIENT), ("qemu", QEMU), ("image", IMAGE)):
            tpm.measure(kind, digest, kind)
        quotes, verifies = [], []
        for _ in range(rounds):
            nonce = os.urandom(32)
            t, quote = timed(lambda: tpm.quote(nonce))
            quotes.append(t)
        policy = evidence.Policy(**{kind: [e["digest"] for e in quote["events"] if e["kind"] == kind]
                                    for kind in evidence.POLICY_KINDS})
        verifies = cpuEach(lambda: evidence.verifyQuote(akPublic, quote, nonce, policy), rounds)
        rsaVerify = rsaBaseline(rounds)
        attested = evidence.verifyQuote(akPublic, quote, nonce, policy)
        bindings, unwraps, checks = [], [], []
        for _ in range(max(1, rounds // 10)):
            nonce = os.urandom(32)
            t, binding = timed(lambda: tpm.bindingKey(nonce, attested.pcrs))
            bindings.append(t)
            t, wrapped = timed(lambda: evidence.wrapSecret(
                evidence.verifyBindingKey(akPublic, binding, nonce, attested.pcrs), os.urandom(32)))
            checks.append(t)
            t, _ = timed(lambda: tpm.unwrap(binding, wrapped))
            unwraps.append(t)
        tpm.close()
    finally:
        swtpms.stop()
    verifyMedian, rsaMedian = stats.median(verifies), stats.median(rsaVerify)
    return {
        "tpm": swtpmVersion(),
        "enrolment_seller_ms": stats.summary(ms(sellerSide)),
        "enrolment_market_ms": stats.summary(ms(marketSide)),
        "quote_ms": stats.summary(ms(quotes)),
        "verify_quote_cpu_ms": stats.summary(ms(verifies)),
        "rsa2048_verify_cpu_ms": stats.summary(ms(rsaVerify)),
        "verify_quote_vs_rsa_verify": stats.ratio(verifyMedian, rsaMedian),
        "events_in_quote": len(quote["events"]),
        "binding_key_ms": stats.summary(ms(bindings)),
        "verify_binding_and_wrap_ms": stats.summary(ms(checks)),
        "unwrap_ms": stats.summary(ms(unwraps)),
    }


def rsaBaseline(rounds):
    """CPU seconds of one RSA-2048 PKCS#1 v1.5 sha256 verification, batched as verifyQuote is."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    data = os.urandom(150)
    signature = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    public = key.public_key()
    return cpuEach(lambda: public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256()), rounds)


def swtpmVersion():
    """What `swtpm --version` says (the software TPM measured)."""
    out = subprocess.run(["swtpm", "--version"], capture_output=True, text=True, timeout=10).stdout
    return out.strip().splitlines()[0] if out.strip() else None


# -- as the market sees it ---------------------------------------------------

PLAIN = hashlib.sha256(b"bench").hexdigest()
ENCRYPTED = hashlib.sha256(b"bench, encrypted").hexdigest()


class SellerControl:
    """A seller's connection in this process: the market's commands go to a real TrustedSeller."""

    def __init__(self, trusted, started):
        self.trusted = trusted
        self.started = started

    def callRemote(self, command, **kw):
        from twisted.internet import defer
        from cpushare.protocol import commands
        # As on the wire: the arguments encoded and parsed, then the answer.
        kw = command.parseArguments(command.makeArguments(kw, None), None)
        if command is commands.StartVM:
            self.started[kw["vm"]] = time.perf_counter()
            return defer.succeed({})
        if command is commands.StopVM:
            return defer.succeed({})
        if command is commands.Attest:
            d = defer.ensureDeferred(self.trusted.attest(kw["nonce"], kw.get("vm"),
                                                         kw.get("image")))
        elif command is commands.BindingKey:
            d = defer.ensureDeferred(self.trusted.bindingKey(kw["vm"], kw["nonce"], kw["pcrs"]))
        elif command is commands.ReleaseKey:
            d = defer.ensureDeferred(self.trusted.releaseKey(kw["vm"], kw["wrapped"]))
            d.addCallback(lambda _: {})
        else:
            return defer.succeed({})
        return d.addCallback(lambda answer: command.parseResponse(
            command.makeResponse(answer, None), None))


class ImageKeys:
    """The image store's keys as Attestations asks them: one encrypted image."""

    def unsealed(self, account, sha256):
        return os.urandom(32) if sha256 == ENCRYPTED else None


async def marketSide(reactor, folder, software, ca, rounds, say):
    """The market's figures of lease attestation and lease start (see the module)."""
    from twisted.internet import defer, task
    from cpushare.client.seller.trusted import TrustedSeller, fileDigest, packageDigest
    from cpushare.protocol.mux import Routing
    from cpushare.server.db import store, tpmsql
    from cpushare.server.db.store import Account
    from cpushare.server.market.market import Market
    from cpushare.server.market.orders import PlacedVMs
    from cpushare.server.market.screens import Screens
    from cpushare.server.money import ledger
    from cpushare.money import MICRO

    qemu = shutil.which("qemu-system-x86_64") or sys.executable
    db = store.Store(reactor, os.path.join(folder, "market.sqlite"))
    db.startService()
    tpmService = tpmlib.TPMService(reactor, software.spec, os.path.join(folder, "seller"),
                                   eventLog=software.eventLog)
    os.makedirs(tpmService.home)
    try:
        await db.open()

        def populate(cursor):
            stamp = store.now()
            ids = []
            for name in ("seller", "buyer"):
                cursor.execute("INSERT INTO accounts (name, created) VALUES (?, ?) RETURNING id",
                               (name, stamp))
                ids.append(cursor.fetchone()[0])
            for image in (PLAIN, ENCRYPTED):
                cursor.execute("INSERT INTO images (sha256, size, stored) VALUES (?, 1000, ?)",
                               (image, stamp))
                cursor.execute("INSERT INTO account_images (account_id, sha256, name, uploaded)"
                               " VALUES (?, ?, 'bench.iso', ?)", (ids[1], image, stamp))
            ledger.post(cursor, "credit", "bench", [(ledger.GRANTS, None, -1000 * MICRO),
                                                    (ledger.FUNDS, ids[1], 1000 * MICRO)])
            with open(software.eventLog, "rb") as f:
                for event in parseTCG(f.read()):
                    if event["kind"] in ("firmware", "kernel"):
                        tpmsql.allow(cursor, event["kind"], event["digest"])
            tpmsql.allow(cursor, "client", packageDigest())
            tpmsql.allow(cursor, "qemu", fileDigest(os.path.realpath(qemu)))
            return ids

        sellerId, buyerId = await db.run(populate)
        market = Market(reactor, db, credentials=None, attestations={
            "cas": [ca], "every": 3600.0, "timeout": 60.0, "commission": 100_000})
        market.attestations.imagekeys = ImageKeys()
        started = {}

        class Seller(Routing):
            role = "seller"
            connected = True
            certificate = "bench-certificate"
            sessionId = 1

            def __init__(self):
                Routing.__init__(self)
                self.account = Account(sellerId, "seller", 0.0)
                self.offer = {"cores": 4 * rounds + 8, "memory": 1024 * (4 * rounds + 8)}
                self.heartbeat = None
                self.connectedAt = time.time()
                self.vms, self.links, self.stopping = PlacedVMs(), {}, {}

            def sendFrame(self, channel, data):
                pass

        seller = Seller()
        trusted = TrustedSeller(reactor, tpmService, tpmService.home, qemu,
                                running=lambda: len(started))
        seller.control = SellerControl(trusted, started)
        market.sessions[seller.sessionId] = seller
        await market.board.sellerOnline(seller, 20_000, 0, "IT", 30_000)
        # Enrolment, as the seller's connection does it.
        ekCert, ekPublic = await tpmService.endorsement()
        akPublic = await tpmService.attestationKey()
        answer = await market.attestations.enrol(seller, ekCert, ekPublic, akPublic)
        secret = await tpmService.activate({k: answer[k] for k in ("credential_blob",
                                                                    "encrypted_secret")})
        await market.attestations.activate(seller, secret)
        while seller.trust.attested is None:
            if seller.trust.untrusted not in (None, "not attested yet"):
                raise RuntimeError(f"the seller was not attested: {seller.trust.untrusted}")
            await task.deferLater(reactor, 0.01, lambda: None)

        class VM:
            def __init__(self, n):
                self.id, self.image, self.leaseId = 100_000 + n, PLAIN, None

        attests = []
        for n in range(rounds):
            t0 = time.perf_counter()
            if await market.attestations.attest(seller, VM(n)) is None:
                raise RuntimeError(f"a lease's quote was refused: {seller.trust.untrusted}")
            attests.append(time.perf_counter() - t0)
        say(f"a lease's attestation as the market sees it: median "
            f"{stats.median(ms(attests)):.1f} ms")

        buyer = Account(buyerId, "buyer", 0.0)

        async def start(image, trustedOrder):
            screens = Screens.fromArguments(trusted=trustedOrder or None)
            t0 = time.perf_counter()
            placed = await market.orders.place(buyer, image, 1, 1, 256, screens)
            [vm] = placed["vm_ids"]
            deadline = t0 + 60
            while vm not in started:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"VM {vm} ({image}, trusted {trustedOrder}) never started:"
                                       f" {market.orders.vms[vm].reason}")
                await task.deferLater(reactor, 0.002, lambda: None)
            return started[vm] - t0

        starts = {"untrusted": [], "trusted": [], "trusted_encrypted": []}
        for _ in range(rounds):
            starts["untrusted"].append(await start(PLAIN, False))
            starts["trusted"].append(await start(PLAIN, True))
        for _ in range(max(1, rounds // 5)):
            starts["trusted_encrypted"].append(await start(ENCRYPTED, True))
        market.billing.stop()
        market.attestations.stop()
        market.orders.stop()
        medians = {kind: stats.median(ms(values)) for kind, values in starts.items()}
        say("lease start (placed -> StartVM): " + ", ".join(
            f"{kind} {median:.1f} ms" for kind, median in medians.items()))
        await defer.succeed(None)
        return {
            "lease_attestation_ms": stats.summary(ms(attests)),
            "lease_start_untrusted_ms": stats.summary(ms(starts["untrusted"])),
            "lease_start_trusted_ms": stats.summary(ms(starts["trusted"])),
            "lease_start_trusted_encrypted_ms": stats.summary(ms(starts["trusted_encrypted"])),
            "lease_start_trusted_vs_untrusted": stats.ratio(medians["trusted"],
                                                            medians["untrusted"]),
            "lease_start_round_trips_before_startvm": {"untrusted": 0, "trusted": 1,
                                                       "trusted_encrypted": 3},
        }
    finally:
        await tpmService.stopService()
        await db.stopService()


def leaseFigures(folder, rounds, say):
    """L{marketSide} on a fresh swtpm, on the real reactor."""
    from twisted.internet import defer, reactor
    swtpms = SoftwareTPMs(os.path.join(folder, "market-side"))
    box = {}

    def run():
        d = defer.ensureDeferred(marketSide(reactor, os.path.join(folder, "market"),
                                            swtpms.make(), swtpms.ca, rounds, say))
        d.addCallbacks(lambda r: box.setdefault("result", r),
                       lambda f: box.setdefault("failure", f))
        d.addBoth(lambda _: reactor.stop())

    try:
        reactor.callWhenRunning(run)
        reactor.run()
    finally:
        swtpms.stop()
    if "failure" in box:
        box["failure"].raiseException()
    return box["result"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="cpushare-bench-attest-")
    result = {"when": stats.now(), "cpu": stats.cpuModel(), "git": stats.gitState()}
    try:
        result.update(measure(os.path.join(folder, "evidence"), args.rounds))
        result.update(leaseFigures(folder, min(args.rounds, 20), log))
    except (OSError, RuntimeError, tpmlib.EvidenceError) as e:
        log(f"failed: {e}")
        return 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    log(f"enrolment: seller {result['enrolment_seller_ms']['median']} ms, market "
        f"{result['enrolment_market_ms']['median']} ms; a quote {result['quote_ms']['median']} ms; "
        f"verifyQuote {result['verify_quote_cpu_ms']['median']} ms of CPU, "
        f"x{result['verify_quote_vs_rsa_verify']} one RSA-2048 verification")
    log(f"wrote {stats.write(stats.resultPath('attest'), result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
