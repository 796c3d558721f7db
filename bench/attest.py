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

Results go to bench/results/attest.json.  Nothing here asserts a speed:
the exit status is non-zero only when a measurement could not be taken.
A hardware TPM is much slower than swtpm (RSA key creation takes seconds
there); these figures are the software's own cost.
"""

import argparse
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="cpushare-bench-attest-")
    result = {"when": stats.now(), "cpu": stats.cpuModel(), "git": stats.gitState()}
    try:
        result.update(measure(folder, args.rounds))
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
