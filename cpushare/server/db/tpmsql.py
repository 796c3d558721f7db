"""
The SQL of trusted computing: the sellers' TPM attestation keys and the
operator's attestation policy (schema 014_trusted.sql).  The rules are in
L{cpushare.server.market.attestation}.
"""

from cpushare.server.db.store import now

KINDS = ("firmware", "kernel", "qemu", "client")
ALLOW_ANY_FIRMWARE = "allow_any_firmware"


def keyOf(cursor, akName):
    """The enrolled key named C{akName} (hex): a dict, or None."""
    cursor.execute(
        "SELECT account_id, certificate, ek_fingerprint, ek_issuer, ak_public, enrolled,"
        " last_attested, last_result FROM tpm_keys WHERE ak_name = ?", (akName,))
    row = cursor.fetchone()
    if row is None:
        return None
    keys = ("account", "certificate", "ek_fingerprint", "ek_issuer", "ak_public", "enrolled",
            "last_attested", "last_result")
    return dict(zip(keys, row))


def enrol(cursor, akName, accountId, certificate, ekFingerprint, ekIssuer, akPublicHex):
    """
    Bind the key C{akName} to C{accountId} and its certificate
    C{certificate}; returns None, or why not (another account or
    certificate holds it).
    """
    known = keyOf(cursor, akName)
    if known is not None:
        return ownerProblem(known, accountId, certificate)
    cursor.execute(
        "INSERT INTO tpm_keys (ak_name, account_id, certificate, ek_fingerprint, ek_issuer,"
        " ak_public, enrolled) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (akName, accountId, certificate, ekFingerprint, ekIssuer, akPublicHex, now()))
    return None


def ownerProblem(known, accountId, certificate):
    """Why the key C{known} (L{keyOf}) is not this account's and certificate's, or None."""
    if known["account"] != accountId:
        return "this attestation key is enrolled by another account"
    if known["certificate"] != certificate:
        return (f"this attestation key is bound to another certificate of this account"
                f" ({known['certificate'][:16]}...), not the one of this connection")
    return None


def recordResult(cursor, akName, attested, result):
    """The key's last attestation: C{attested} (a time) when it passed, and its result."""
    if attested is None:
        cursor.execute("UPDATE tpm_keys SET last_result = ? WHERE ak_name = ?",
                       (result, akName))
    else:
        cursor.execute("UPDATE tpm_keys SET last_attested = ?, last_result = ?"
                       " WHERE ak_name = ?", (attested, result, akName))


def enrolled(cursor):
    """The enrolled keys with their account's name, by account."""
    cursor.execute(
        "SELECT a.name, k.ak_name, k.ek_issuer, k.enrolled, k.last_attested, k.last_result"
        " FROM tpm_keys k JOIN accounts a ON a.id = k.account_id ORDER BY a.name, k.enrolled")
    keys = ("account", "ak_name", "ek_issuer", "enrolled", "last_attested", "last_result")
    return [dict(zip(keys, row)) for row in cursor.fetchall()]


def forget(cursor, accountName):
    """Forget the keys enrolled by the account named C{accountName}; returns how many."""
    cursor.execute("DELETE FROM tpm_keys WHERE account_id IN"
                   " (SELECT id FROM accounts WHERE name = ?)", (accountName,))
    return cursor.rowcount


def policy(cursor):
    """The operator's policy as JSON-able data: {kind: [digests]} and allow_any_firmware."""
    found = {kind: [] for kind in KINDS}
    cursor.execute("SELECT kind, digest FROM tpm_policy ORDER BY kind, digest")
    for kind, digest in cursor.fetchall():
        found.setdefault(kind, []).append(digest)
    cursor.execute("SELECT value FROM tpm_settings WHERE name = ?", (ALLOW_ANY_FIRMWARE,))
    row = cursor.fetchone()
    found[ALLOW_ANY_FIRMWARE] = row is not None and row[0] == "1"
    return found


def allow(cursor, kind, digest):
    """Allow C{digest} of C{kind}; returns False when it was allowed already."""
    cursor.execute("SELECT 1 FROM tpm_policy WHERE kind = ? AND digest = ?", (kind, digest))
    if cursor.fetchone() is not None:
        return False
    cursor.execute("INSERT INTO tpm_policy (kind, digest, added) VALUES (?, ?, ?)",
                   (kind, digest, now()))
    return True


def disallow(cursor, kind, digest):
    """No longer allow C{digest} of C{kind}; returns False when it was not allowed."""
    cursor.execute("DELETE FROM tpm_policy WHERE kind = ? AND digest = ?", (kind, digest))
    return cursor.rowcount > 0


def setAnyFirmware(cursor, allowed):
    """Let any boot chain pass (C{allowed}), or only the digests listed."""
    cursor.execute("DELETE FROM tpm_settings WHERE name = ?", (ALLOW_ANY_FIRMWARE,))
    cursor.execute("INSERT INTO tpm_settings (name, value) VALUES (?, ?)",
                   (ALLOW_ANY_FIRMWARE, "1" if allowed else "0"))
