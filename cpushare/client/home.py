"""
A client's home folder: its identity on one market.

    key.pem      the account's private key (0600); generated here, never sent
    cert.pem     the client certificate the market's CA signed
    ca.pem       the market's CA certificate, to verify the server
    config.json  {"server": "HOST:PORT", "name": ..., "account_id": ...}
    results/ORDER/VM.result  a VM's result, saved by the buyer's program
    compare/ORDER.json       the command comparing an order's results

The default home is $CPUSHARE_HOME, else ~/.cpushare.
"""

import json
import os

from cpushare import pki


class HomeError(Exception):
    """The home folder is missing something; the message says what."""


def defaultHome():
    return os.environ.get("CPUSHARE_HOME") or os.path.expanduser("~/.cpushare")


def parseServer(address, defaultPort=7444):
    """C{HOST:PORT}, C{HOST} or C{[V6]:PORT} as (host, port)."""
    address = address.strip()
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif address.count(":") == 1:
        host, port = address.split(":")
    else:
        host, port = address, ""
    if not host:
        raise HomeError(f"no host in server address {address!r}")
    try:
        port = int(port) if port else defaultPort
    except ValueError:
        raise HomeError(f"bad port in server address {address!r}")
    if not 0 < port < 65536:
        raise HomeError(f"bad port in server address {address!r}")
    return host, port


class Home:
    def __init__(self, path):
        self.path = os.path.abspath(path)

    def file(self, name):
        return os.path.join(self.path, name)

    def exists(self):
        return os.path.exists(self.file("config.json"))

    def read(self, name):
        try:
            with open(self.file(name), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise HomeError(
                f"{self.file(name)} is missing: register first with "
                f"'cpushare --home {self.path} register'"
            )

    @property
    def config(self):
        try:
            return json.loads(self.read("config.json"))
        except ValueError as e:
            raise HomeError(f"{self.file('config.json')} is not valid JSON: {e}")

    @property
    def server(self):
        return parseServer(self.config["server"])

    def credentials(self):
        """(ca PEM, key PEM, certificate PEM)."""
        return self.read("ca.pem"), self.read("key.pem"), self.read("cert.pem")

    def prepareKey(self):
        """The account key: made now (0600) if this home has none yet."""
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        if os.path.exists(self.file("key.pem")):
            return pki.loadKey(self.read("key.pem"))
        key = pki.generateKey()
        pki.writePrivate(self.file("key.pem"), pki.keyToPEM(key))
        return key

    def saveNewCertificate(self, key, certPEM):
        """
        Put a new key and its certificate in place of the old ones (kept as
        key.pem.old and cert.pem.old until L{forgetOldCertificate}), each file
        replaced whole so that a reader never sees half of one.
        """
        pki.writePrivate(self.file("key.pem.new"), pki.keyToPEM(key))
        pki.writePublic(self.file("cert.pem.new"), certPEM)
        for name in ("key.pem", "cert.pem"):
            os.replace(self.file(name), self.file(name + ".old"))
        for name in ("key.pem", "cert.pem"):
            os.replace(self.file(name + ".new"), self.file(name))

    def forgetOldCertificate(self):
        for name in ("key.pem.old", "cert.pem.old"):
            try:
                os.remove(self.file(name))
            except FileNotFoundError:
                pass

    def saveRegistration(self, server, name, accountId, caPEM, certPEM):
        pki.writePublic(self.file("ca.pem"), caPEM)
        pki.writePublic(self.file("cert.pem"), certPEM)
        pki.writePublic(
            self.file("config.json"),
            json.dumps(
                {"server": server, "name": name, "account_id": accountId}, indent=2
            ).encode() + b"\n",
        )


def resultPath(home, order, vm):
    """Where the buyer's program saves VM C{vm}'s result: HOME/results/ORDER/VM.result."""
    return os.path.join(home, "results", str(int(order)), f"{int(vm)}.result")


COMPARATOR_MAX = 64 * 1024  # bytes of a comparator file read at most


def comparatorPath(home, order):
    """
    Where the command comparing order C{order}'s results is kept:
    HOME/compare/ORDER.json, C{{"argv": [...]}}, written by `cpushare order
    place --compare` and read by the buyer's program; never sent anywhere.
    """
    return os.path.join(home, "compare", f"{int(order)}.json")


def saveComparator(home, order, argv):
    """Keep C{argv} as order C{order}'s comparator (replaced whole, readable only by its owner)."""
    path = comparatorPath(home, order)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    pki.writePrivate(path, json.dumps({"argv": list(argv)}).encode() + b"\n")
    return path


def loadComparator(home, order):
    """
    Order C{order}'s comparator as a list of words, or None when this home
    has none for it or its file is not one (too long, not JSON, no
    non-empty list of words without NUL characters in C{argv}).
    """
    try:
        with open(comparatorPath(home, order), "rb") as f:
            text = f.read(COMPARATOR_MAX + 1)
    except OSError:
        return None
    if len(text) > COMPARATOR_MAX:
        return None
    try:
        argv = json.loads(text).get("argv")
    except (ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(argv, list) or not argv or argv[0] == "" or not all(
            isinstance(word, str) and "\0" not in word for word in argv):
        return None
    return argv
