"""
The seller's side of trusted computing: its TPM, through tpm2-pytss (ESAPI).

L{open} a TPM by its device path (/dev/tpmrm0, the kernel's resource
manager, or /dev/tpm0) or a software TPM's socket ("swtpm:host=H,port=P").
L{TPM} makes the evidence L{cpushare.attest.evidence} checks: the
endorsement key and its certificate, an attestation key kept in the
seller's home, credential activation, quotes, binding keys and their
unwrapping.  Its calls block on the TPM, so the seller uses L{TPMService}:
the same calls as Deferreds, one at a time on a thread of their own.

What a market may ask of this module, and nothing more (a compromised
market sends the challenges and nonces): quote the fixed selection
L{PCRS} with the AK over a bounded nonce; certify with the AK only binding
keys this object created itself; activate a credential for this TPM's own
AK and EK; unwrap only with a binding key it made, only through a
PolicyPCR session, never with a password.

Keys live under one storage primary in the endorsement hierarchy (ECC
P-256, derived again at each start from the TPM's seed), so the AK's
quotes carry the TPM's reset and restart counts in clear.  The TPM's
hierarchies are assumed to have empty authorization values, as on a fresh
Linux machine.  Opening the TPM resets L{CLIENT_PCR}, whose log this
object keeps from empty: the client measures itself again after opening.
"""

import os
import stat
from collections import OrderedDict

from twisted.application import service
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from . import CLIENT_PCR, MAX_EVIDENCE, EvidenceError, bounded
from . import evidence
from .eventlog import MAX_CLIENT_EVENTS, MAX_TCG_LOG, clientEvent, extendValue, parseTCG

# libtss2 logs every TPM error code on stderr; the errors reach the caller
# as exceptions, so its own log stays quiet unless the operator asks.
os.environ.setdefault("TSS2_LOG", "all+NONE")

from tpm2_pytss import ESAPI, TCTILdr  # noqa: E402  (after TSS2_LOG)
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_HC, TPM2_RC, TPM2_SE, TPMA_OBJECT  # noqa: E402
from tpm2_pytss.TSS2_Exception import TSS2_Exception  # noqa: E402
from tpm2_pytss.types import (  # noqa: E402
    TPM2B_DATA, TPM2B_DIGEST, TPM2B_ENCRYPTED_SECRET, TPM2B_ID_OBJECT, TPM2B_PRIVATE,
    TPM2B_PUBLIC, TPM2B_PUBLIC_KEY_RSA, TPM2B_SENSITIVE_CREATE, TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION, TPMS_ATTEST, TPMT_HA, TPMT_RSA_DECRYPT, TPMT_SIG_SCHEME, TPMT_SYM_DEF,
)
from tpm2_pytss.utils import NVReadEK, create_ek_template  # noqa: E402

HOST_EVENT_LOG = "/sys/kernel/security/tpm0/binary_bios_measurements"
"""Where Linux shows the firmware's TCG event log."""
AK_FILES = ("tpm-ak.pub", "tpm-ak.priv")
"""The attestation key's public and TPM-encrypted private parts, in the seller's home."""
MAX_BINDING_KEYS = 16
"""Binding keys kept for unwrapping; the oldest is forgotten first."""
MAX_SPEC = 256

_PARENT = TPM2B_PUBLIC.parse(
    "ecc256:aes128cfb",
    objectAttributes=TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.NODA)
_AK = TPM2B_PUBLIC.parse(
    "rsa2048:rsassa-sha256:null",
    objectAttributes=TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.NODA)
_BINDING_ATTRIBUTES = (TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
                       | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.NODA)
_BOOT_SELECTION = TPML_PCR_SELECTION.parse("sha256:0,1,2,3,4,5,6,7")
_CLIENT_SELECTION = TPML_PCR_SELECTION.parse(f"sha256:{CLIENT_PCR}")
_NULL_SCHEME = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
_CLIENT_PCR_HANDLE = getattr(ESYS_TR, f"PCR{CLIENT_PCR}")


class TPMError(EvidenceError):
    """This machine's TPM is missing, is not a TPM, or fails; kind "tpm"."""

    def __init__(self, reason):
        super().__init__("tpm", reason)


def sha256Extension(digest):
    """What TPM2_PCR_Extend takes to extend a PCR's sha256 bank with C{digest}."""
    value = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
    value.digest.sha256 = digest
    return TPML_DIGEST_VALUES([value])


def _tcti(spec):
    """(TCTI name, its configuration) for a TPM C{spec}; TPMError naming what is wrong."""
    if not isinstance(spec, str) or not spec or len(spec) > MAX_SPEC:
        raise TPMError(f"a TPM is a device path or swtpm:host=H,port=P, at most {MAX_SPEC} characters")
    name, _, conf = spec.partition(":")
    if name in ("swtpm", "mssim"):
        return name, conf
    path = conf if name == "device" else spec
    if not path.startswith("/"):
        raise TPMError(f"{spec!r} is neither a TPM device's path nor swtpm:host=H,port=P")
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise TPMError(f"there is no TPM at {path}: {e.strerror}") from None
    if not stat.S_ISCHR(mode):
        raise TPMError(f"{path} is not a TPM: it is not a character device")
    return "device", path


def open(spec, eventLog=None):
    """
    The L{TPM} at C{spec}; C{eventLog} is the path of the host's TCG event
    log (for devices, L{HOST_EVENT_LOG} when it can be read; none for a
    software TPM).  TPMError names the problem when it cannot be opened.
    """
    name, conf = _tcti(spec)
    if eventLog is None and name == "device" and os.access(HOST_EVENT_LOG, os.R_OK):
        eventLog = HOST_EVENT_LOG
    try:
        tcti = TCTILdr(name, conf)
    except TSS2_Exception as e:
        raise TPMError(f"cannot reach the TPM at {spec}: {e}") from None
    try:
        esapi = ESAPI(tcti)
        esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, 0x100, 1)
    except TSS2_Exception as e:
        tcti.close()
        raise TPMError(f"{spec} does not answer as a TPM 2.0: {e}") from None
    return TPM(esapi, tcti, spec, eventLog)


def _tpmCall(what):
    """A decorator: the TPM's errors inside become a L{TPMError} naming C{what}."""
    def decorate(method):
        def call(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except TSS2_Exception as e:
                raise TPMError(f"the TPM cannot {what}: {e}") from None
        call.__name__ = method.__name__
        call.__doc__ = method.__doc__
        return call
    return decorate


class TPM:
    """One open TPM; blocking calls (use L{TPMService} from the reactor)."""

    log = Logger()

    def __init__(self, esapi, tcti, spec, eventLog=None):
        self.esapi = esapi
        self.tcti = tcti
        self.spec = spec
        self.eventLogPath = eventLog
        self.events = []
        self._bootEvents = None
        self._ak = None
        self._akPublic = None
        self._bindings = OrderedDict()
        try:
            self._flushLeftovers()
            self.parent, _, _, _, _ = esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(), _PARENT, ESYS_TR.ENDORSEMENT)
            esapi.pcr_reset(_CLIENT_PCR_HANDLE)
        except TSS2_Exception as e:
            self.close()
            raise TPMError(f"the TPM at {spec} cannot make its storage key or reset PCR {CLIENT_PCR}: {e}") from None

    def _flushLeftovers(self):
        """Flush transient objects a process before left loaded (a TPM without a resource manager keeps them)."""
        _, data = self.esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, 64)
        for handle in data.data.handles:
            self.esapi.flush_context(self.esapi.tr_from_tpmpublic(handle))

    def close(self):
        """Flush what this object loaded and close the connection."""
        for handle in (self._ak, getattr(self, "parent", None)):
            if handle is not None:
                try:
                    self.esapi.flush_context(handle)
                except TSS2_Exception:
                    pass
        self._ak = self.parent = None
        self.esapi.close()
        self.tcti.close()

    # -- enrolment -----------------------------------------------------------

    def _endorsementKey(self):
        """(EK certificate DER, EK handle, EK TPM2B_PUBLIC) from the TCG default template that matches the certificate."""
        for ekType in ("EK-RSA2048", "EK-ECC256"):
            certificate, template = create_ek_template(ekType, NVReadEK(self.esapi))
            if certificate:
                handle, public, _, _, _ = self.esapi.create_primary(
                    TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT)
                return bytes(certificate), handle, public
        raise TPMError(f"the TPM at {self.spec} holds no endorsement key certificate (NV 0x01c00002 or 0x01c0000a)")

    @_tpmCall("read its endorsement key")
    def endorsement(self):
        """(ekCertDer, ekPublic): the EK's certificate and its marshalled TPM2B_PUBLIC."""
        certificate, handle, public = self._endorsementKey()
        self.esapi.flush_context(handle)
        return certificate, public.marshal()

    @_tpmCall("load or create its attestation key")
    def attestationKey(self, home):
        """
        The AK's marshalled TPM2B_PUBLIC: loaded from C{home} (its two files,
        L{AK_FILES}), or created in the TPM and saved there (0600) the first time.
        """
        if self._akPublic is not None:
            return self._akPublic
        pubPath, privPath = (os.path.join(home, f) for f in AK_FILES)
        if os.path.exists(pubPath) and os.path.exists(privPath):
            public, private = self._readKey(pubPath, privPath)
            try:
                self._ak = self.esapi.load(self.parent, private, public)
            except TSS2_Exception as e:
                raise TPMError(f"the attestation key in {home} is not this TPM's ({e}); remove "
                               f"{' and '.join(AK_FILES)} there to make a new one, and enrol again") from None
        else:
            private, public, _, _, _ = self.esapi.create(self.parent, TPM2B_SENSITIVE_CREATE(), _AK)
            _writePrivate(privPath, private.marshal())
            _writePrivate(pubPath, public.marshal())
            self._ak = self.esapi.load(self.parent, private, public)
        self._akPublic = public.marshal()
        return self._akPublic

    @staticmethod
    def _readKey(pubPath, privPath):
        try:
            with _openFile(pubPath) as f:
                pub = f.read(MAX_EVIDENCE + 1)
            with _openFile(privPath) as f:
                priv = f.read(MAX_EVIDENCE + 1)
            return TPM2B_PUBLIC.unmarshal(bounded("saved AK", pub))[0], \
                TPM2B_PRIVATE.unmarshal(bounded("saved AK", priv))[0]
        except (OSError, TSS2_Exception, EvidenceError) as e:
            raise TPMError(f"the attestation key saved in {pubPath} cannot be read: {e}") from None

    def _requireAK(self):
        if self._ak is None:
            raise TPMError("the attestation key is not loaded: call attestationKey(home) first")
        return self._ak

    def activate(self, challenge):
        """
        The secret of a credential the market made for this TPM's EK and AK
        (TPM2_ActivateCredential); EvidenceError("key") when it was made for
        another TPM or key, "format" when the challenge is malformed.
        """
        ak = self._requireAK()
        if not isinstance(challenge, dict) or set(challenge) != {"credential_blob", "encrypted_secret"}:
            raise EvidenceError("format", "the challenge is not a dict of credential_blob and encrypted_secret")
        blob = evidence.unmarshal(TPM2B_ID_OBJECT, challenge["credential_blob"], "challenge's credential")
        secret = evidence.unmarshal(TPM2B_ENCRYPTED_SECRET, challenge["encrypted_secret"], "challenge's secret")
        try:
            _, ek, _ = self._endorsementKey()
        except TSS2_Exception as e:
            raise TPMError(f"the TPM cannot load its endorsement key: {e}") from None
        session = None
        try:
            session = self.esapi.start_auth_session(
                ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                TPM2_ALG.SHA256)
            self.esapi.policy_secret(ESYS_TR.ENDORSEMENT, session)
            answer = self.esapi.activate_credential(ak, ek, blob, secret, session1=ESYS_TR.PASSWORD,
                                                    session2=session)
            return bytes(answer)
        except TSS2_Exception as e:
            raise EvidenceError("key", f"the TPM cannot activate the credential: it was made for another "
                                       f"TPM or key ({e})") from None
        finally:
            self._flush(session, ek)

    def _flush(self, *handles):
        for handle in handles:
            if handle is not None:
                try:
                    self.esapi.flush_context(handle)
                except TSS2_Exception as e:
                    self.log.warn("the TPM cannot flush a handle: {error}", error=str(e))

    # -- measuring and quoting -----------------------------------------------

    @_tpmCall(f"extend PCR {CLIENT_PCR}")
    def measure(self, kind, digest, what):
        """
        Extend L{CLIENT_PCR} with the event measuring C{digest} (hex sha256) of
        C{kind} ("client", "qemu" or "image"), keep it in the log, return it.
        """
        event = clientEvent(kind, digest, what)
        if len(self.events) >= MAX_CLIENT_EVENTS:
            raise EvidenceError("format", f"the client's event log is full ({MAX_CLIENT_EVENTS} events): "
                                          f"reset PCR {CLIENT_PCR} when no VM runs")
        self.esapi.pcr_extend(_CLIENT_PCR_HANDLE, sha256Extension(extendValue(event)))
        self.events.append(event)
        return event

    @_tpmCall(f"reset PCR {CLIENT_PCR}")
    def resetClientPCR(self):
        """Reset L{CLIENT_PCR} and empty the client's log (when no VM runs)."""
        self.esapi.pcr_reset(_CLIENT_PCR_HANDLE)
        self.events = []

    def bootEvents(self):
        """The host's boot-chain events (read once), or [] without a TCG event log."""
        if self._bootEvents is None:
            if self.eventLogPath is None:
                self._bootEvents = []
            else:
                try:
                    with _openFile(self.eventLogPath) as f:
                        data = f.read(MAX_TCG_LOG + 1)
                except OSError as e:
                    raise TPMError(f"cannot read the TCG event log {self.eventLogPath}: {e.strerror}") from None
                self._bootEvents = parseTCG(data)
        return self._bootEvents

    def pcrValues(self):
        """{pcr: sha256 value} of L{PCRS}, as the TPM holds them now."""
        values = {}
        for selection in (_BOOT_SELECTION, _CLIENT_SELECTION):
            _, selected, digests = self.esapi.pcr_read(selection)
            indexes = [i for i in range(24) if selected.pcrSelections[0].pcrSelect[i // 8] & (1 << (i % 8))]
            values.update(zip(indexes, (bytes(d) for d in digests)))
        return evidence.checkPCRValues(values)

    @_tpmCall("quote")
    def quote(self, nonce):
        """The quote of L{PCRS} over C{nonce}, with the PCR values and the event log (see verifyQuote)."""
        evidence.checkNonce(nonce)
        ak = self._requireAK()
        events = self.bootEvents() + list(self.events)
        for _ in range(3):
            attest, signature = self.esapi.quote(ak, evidence.PCR_SELECTION, TPM2B_DATA(nonce), _NULL_SCHEME)
            pcrs = self.pcrValues()
            quoted = TPMS_ATTEST.unmarshal(bytes(attest.attestationData))[0].attested.quote.pcrDigest
            if bytes(quoted) == evidence.pcrDigest(pcrs):
                return {"attest": attest.marshal(), "signature": signature.marshal(), "pcrs": pcrs,
                        "events": events}
        raise TPMError("the PCRs kept changing while the TPM quoted them")

    # -- binding keys --------------------------------------------------------

    @_tpmCall("make a binding key")
    def bindingKey(self, nonce, pcrs):
        """
        A new RSA decryption key usable only while L{PCRS} hold C{pcrs} (which
        must be their values now), certified by the AK over C{nonce}:
        {"public", "certify", "signature"} for verifyBindingKey.  This object
        keeps the key's TPM-encrypted blob for L{unwrap}.
        """
        evidence.checkNonce(nonce)
        pcrs = evidence.checkPCRValues(pcrs)
        ak = self._requireAK()
        if pcrs != self.pcrValues():
            raise EvidenceError("key", "the PCRs changed since the quote the binding key is asked for")
        template = TPM2B_PUBLIC.parse("rsa2048:null:null", objectAttributes=_BINDING_ATTRIBUTES,
                                      authPolicy=evidence.pcrPolicyDigest(pcrs))
        private, public, _, _, _ = self.esapi.create(self.parent, TPM2B_SENSITIVE_CREATE(), template)
        handle = self.esapi.load(self.parent, private, public)
        try:
            certify, signature = self.esapi.certify(handle, ak, TPM2B_DATA(nonce), _NULL_SCHEME)
        finally:
            self._flush(handle)
        binding = {"public": public.marshal(), "certify": certify.marshal(), "signature": signature.marshal()}
        self._bindings[binding["public"]] = (private, public)
        while len(self._bindings) > MAX_BINDING_KEYS:
            self._bindings.popitem(last=False)
        return binding

    def unwrap(self, binding, wrapped):
        """
        The secret C{wrapped} (by wrapSecret) to a binding key this object
        made, decrypted by the TPM through a PolicyPCR session: EvidenceError("key")
        when the PCRs are no longer in the state the key is bound to.
        """
        public = binding.get("public") if isinstance(binding, dict) else None
        keys = self._bindings.get(public) if isinstance(public, bytes) else None
        if keys is None:
            raise EvidenceError("key", "this TPM made no such binding key (or has forgotten it)")
        if not isinstance(wrapped, bytes) or len(wrapped) != 256:
            raise EvidenceError("format", "a wrapped secret is 256 bytes (RSA-2048)")
        handle = session = None
        try:
            handle = self.esapi.load(self.parent, *keys)
            session = self.esapi.start_auth_session(
                ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                TPM2_ALG.SHA256)
            self.esapi.policy_pcr(session, TPM2B_DIGEST(), evidence.PCR_SELECTION)
            scheme = TPMT_RSA_DECRYPT(scheme=TPM2_ALG.OAEP)
            scheme.details.oaep.hashAlg = TPM2_ALG.SHA256
            secret = self.esapi.rsa_decrypt(handle, TPM2B_PUBLIC_KEY_RSA(wrapped), scheme,
                                            TPM2B_DATA(evidence.WRAP_LABEL), session1=session)
            return bytes(secret)
        except TSS2_Exception as e:
            if _errorNumber(e.rc) == TPM2_RC.POLICY_FAIL:
                raise EvidenceError("key", "the TPM refuses to unwrap the secret: its PCRs are no longer "
                                           "in the attested state") from None
            raise EvidenceError("key", f"the TPM cannot unwrap the secret ({e})") from None
        finally:
            self._flush(session, handle)


def _errorNumber(rc):
    """A TPM response code without the handle, parameter or session number it names."""
    code = rc & 0xFFFF
    return code & 0x0BF if code & 0x080 else code


def _openFile(path):
    """A file opened for reading without following a last symlink."""
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb")


def _writePrivate(path, data):
    """Write C{data} to C{path}, readable by its owner only (0600), whole or not at all."""
    tmp = path + ".tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class TPMService(service.Service):
    """
    A seller's TPM as Deferreds: each call of L{TPM} runs on one thread of its
    own (a TPM does one command at a time), never on the reactor.  The TPM is
    opened by the first call; stopping the service closes it.
    """

    def __init__(self, reactor, spec, home, eventLog=None, opener=open):
        self.reactor = reactor
        self.spec = spec
        self.home = home
        self.eventLog = eventLog
        self._opener = opener
        self._tpm = None
        self.pool = ThreadPool(1, 1, name="cpushare-tpm")
        self.pool.start()
        self._shutdown = reactor.addSystemEventTrigger("during", "shutdown", self._stopPool)

    def _stopPool(self):
        self._shutdown = None
        self.pool.stop()

    def _call(self, name, *args):
        def inThread():
            if self._tpm is None:
                self._tpm = self._opener(self.spec, eventLog=self.eventLog)
            return getattr(self._tpm, name)(*args)
        return deferToThreadPool(self.reactor, self.pool, inThread)

    def endorsement(self):
        return self._call("endorsement")

    def attestationKey(self):
        return self._call("attestationKey", self.home)

    def activate(self, challenge):
        return self._call("activate", challenge)

    def measure(self, kind, digest, what):
        return self._call("measure", kind, digest, what)

    def resetClientPCR(self):
        return self._call("resetClientPCR")

    def quote(self, nonce):
        return self._call("quote", nonce)

    def bindingKey(self, nonce, pcrs):
        return self._call("bindingKey", nonce, pcrs)

    def unwrap(self, binding, wrapped):
        return self._call("unwrap", binding, wrapped)

    def stopService(self):
        """Close the TPM on its thread, then stop the thread."""
        service.Service.stopService(self)

        def close():
            if self._tpm is not None:
                self._tpm.close()
                self._tpm = None
        d = deferToThreadPool(self.reactor, self.pool, close)

        def stopped(result):
            if self._shutdown is not None:
                self.reactor.removeSystemEventTrigger(self._shutdown)
                self._stopPool()
            return result
        return d.addBoth(stopped)
