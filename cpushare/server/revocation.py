"""
The market CA's certificate revocation list, served on the web port at
/ca.crl (DER, signed by the CA), the address every certificate the CA
issues names in its CRL distribution points.

It lists the certificates revoked (by C{cpushare-admin revoke}, or
replaced by C{cpushare rekey}) and those of deleted accounts, as recorded
in the certificates table; certificates issued before their serial numbers
were recorded cannot be listed (the market still refuses them at the
handshake, which is what protects the market itself), nor are those past
their validity.  A suspension is not a revocation: it is undone by
C{unsuspend}, so it is not listed.

A new list is made at start, within about a second of every change of
access (L{cpushare.server.access.AccessWatch} calls L{changed}), and every
REFRESH_EVERY seconds, so it never passes its nextUpdate
(pki.CRL_LIFETIME) while the server runs.  Reading the certificates goes
through the store's pool, signing through the reactor's thread pool.
"""

import datetime

from cryptography import x509
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource

from cpushare import pki
from cpushare.server.db import store
from cpushare.server.clocked import ClockedService

# Seconds between new lists when nothing is revoked: well inside pki.CRL_LIFETIME.
REFRESH_EVERY = 3600.0
CONTENT_TYPE = b"application/pkix-crl"


def revokedEntries(rows, now):
    """
    The CRL entries [(serial, when, reason)] for rows of
    L{store.revokedCertificates}, leaving out the certificates past their
    validity.
    """
    entries = []
    for serial, revoked, deleted, issued in rows:
        issuedAt = datetime.datetime.fromisoformat(issued)
        if issuedAt + pki.CLIENT_VALIDITY < now:
            continue
        if revoked is not None:
            when, reason = revoked, None
        else:
            when, reason = deleted, x509.ReasonFlags.cessation_of_operation
        entries.append((int(serial, 16), datetime.datetime.fromisoformat(when), reason))
    return entries


class RevocationList(ClockedService):
    """
    The current list, as C{der}.  C{inThread(f, *args)} runs the signing
    (the reactor's thread pool by default).
    """

    log = Logger()

    def __init__(self, reactor, store, credentials, every=REFRESH_EVERY,
                 lifetime=pki.CRL_LIFETIME, inThread=None):
        ClockedService.__init__(self, reactor, every, inThread)
        self.store = store
        self.credentials = credentials
        self.lifetime = lifetime
        self.der = None
        self.number = 0
        self.count = 0
        self._running = False
        self._again = False

    def first(self):
        """Make the first list (fires when it is ready)."""
        return self.update()

    def repeat(self):
        return self.changed()

    def changed(self):
        """Certificates may have been revoked: make a new list (errors are logged)."""
        self.update().addErrback(
            lambda f: self.log.failure("making the certificate revocation list", f))

    def update(self):
        """
        Make a new list from the database.  One at a time: a change during
        an update makes another after it.
        """
        if self._running:
            self._again = True
            return defer.succeed(None)
        self._running = True
        return defer.ensureDeferred(self._update())

    async def _update(self):
        try:
            while True:
                self._again = False
                rows = await self.store.run(store.revokedCertificates)
                now = self.now()
                entries = revokedEntries(rows, now)
                # CRLNumber grows with each list, across restarts too.
                number = max(self.number + 1, int(now.timestamp()))
                creds = self.credentials
                self.der = await self.inThread(
                    pki.makeRevocationList, creds.caKey, creds.caCert, entries, number,
                    now, self.lifetime)
                self.number = number
                if len(entries) != self.count:
                    self.log.info("the revocation list names {count} certificates",
                                  count=len(entries))
                self.count = len(entries)
                if not self._again:
                    return
        finally:
            self._running = False


class RevocationListPage(resource.Resource):
    """GET /ca.crl: the current list."""

    isLeaf = True

    def __init__(self, revocations):
        resource.Resource.__init__(self)
        self.revocations = revocations

    def render_GET(self, request):
        der = self.revocations.der
        if der is None:
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"the revocation list is not ready yet\n"
        request.setHeader(b"content-type", CONTENT_TYPE)
        return der
