"""
cpushare: the command line for buyers and sellers.

    cpushare [--home H] register --server HOST:PORT --ca ca.pem --name NAME
    cpushare [--home H] whoami
    cpushare [--home H] rekey
    cpushare [--home H] sellers [SCREENS] [--explain] [--json]
    cpushare terms, leases, rate (see marketcli)
    cpushare image build -o job.iso [--add DIR]... [--ssh-key KEY.pub]... [--no-ssh-key]
                         [--base other.iso] [--cache DIR]
    cpushare image upload|list, order place|cancel, vms, vm stop, console (see vmcli)
    cpushare funds add, balance, statement, earnings, payout (see fundscli)

Every failure is one line on stderr, naming the problem, and exit status 1.
"""

import argparse
import json
import sys
import time

from twisted.internet import defer, task

from cpushare import pki
from cpushare.client.home import Home, HomeError, defaultHome, parseServer
from cpushare.client.session import ConnectError, connectOnce, endpointFor, explain
from cpushare.protocol import commands


class CommandError(Exception):
    """A user-facing failure of a command."""


def _call(session, command, host, port, **kw):
    d = session.control.callRemote(command, **kw)

    def fail(failure):
        raise CommandError(explain(failure, host, port))

    return d.addErrback(fail)


async def close(session):
    """Close the session cleanly and wait until it is closed."""
    if session.connected:
        session.transport.loseConnection()
        await session.whenLost()


async def connectHome(reactor, home, role="cli"):
    from cpushare.client.session import homeEndpoint

    host, port = home.server
    session = await connectOnce(
        reactor, homeEndpoint(reactor, home), role, host=host, port=port
    )
    return session, host, port


class Market:
    """
    A command's connection to the market: C{async with Market(reactor,
    home) as market:}, then C{await market.call(Command, ...)}; failures
    become one-line CommandErrors, and the connection is closed at the end.
    """

    def __init__(self, reactor, home):
        self.reactor = reactor
        self.home = home
        self.session = None

    async def __aenter__(self):
        self.session, self.host, self.port = await connectHome(self.reactor, self.home)
        return self

    async def __aexit__(self, *exc):
        await close(self.session)

    def call(self, command, **kw):
        return _call(self.session, command, self.host, self.port, **kw)

    async def every(self, command, name, key, cursor, **kw):
        """
        All the entries of the paged list C{name} that C{command} answers
        with, page after page: each next page is asked for with C{cursor}
        set to the C{key} of the last entry so far, until C{more} is false.
        """
        found = []
        while True:
            page = await self.call(command, **kw)
            found.extend(page[name])
            if not page["more"] or not page[name]:
                return found
            kw[cursor] = page[name][-1][key]


async def register(reactor, args, home):
    if home.exists():
        raise CommandError(
            f"{home.path} already holds account {home.config.get('name')!r}; "
            "use another --home"
        )
    try:
        with open(args.ca, "rb") as f:
            caPEM = f.read()
        pki.loadCertificate(caPEM)
    except OSError as e:
        raise CommandError(f"cannot read the CA file {args.ca}: {e.strerror}")
    except ValueError:
        raise CommandError(f"{args.ca} is not a PEM certificate")
    host, port = parseServer(args.server)
    key = home.prepareKey()
    csr = pki.makeRequest(key, args.name)
    session = await connectOnce(
        reactor, endpointFor(reactor, host, port, caPEM), "cli",
        hello=False, host=host, port=port,
    )
    try:
        result = await _call(session, commands.Register, host, port, name=args.name, csr=csr)
    finally:
        await close(session)
    home.saveRegistration(f"{host}:{port}", args.name, result["account_id"],
                          caPEM, result["certificate"])
    print(f"registered account {args.name} (id {result['account_id']}) "
          f"at {host}:{port}; credentials in {home.path}")


async def whoami(reactor, args, home):
    async with Market(reactor, home) as market:
        info = await market.call(commands.WhoAmI)
        host, port = market.host, market.port
    if args.json:
        print(json.dumps(dict(info, server=f"{host}:{port}", home=home.path)))
        return
    print(f"account:     {info['name']} (id {info['account_id']})")
    print(f"created:     {info['created']}")
    print(f"server:      {host}:{port}")
    print(f"certificate: sha256 {info['fingerprint']}")
    try:
        print(f"serial:      {pki.serialHex(pki.loadCertificate(home.read('cert.pem')))}")
    except (HomeError, ValueError):
        pass
    print(f"home:        {home.path}")


async def rekey(reactor, args, home):
    """
    A new key made here and a certificate for it, asked over the current
    certificate's connection; once both are stored, a connection with the
    new one makes the market revoke the old one.
    """
    name = home.config.get("name")
    key = pki.generateKey()
    async with Market(reactor, home) as market:
        answer = await market.call(commands.Rekey, csr=pki.makeRequest(key, name))
    certPEM = answer["certificate"]
    try:
        cert = pki.loadCertificate(certPEM)
    except ValueError:
        raise CommandError("the market answered with a certificate that does not parse")
    home.saveNewCertificate(key, certPEM)
    async with Market(reactor, home) as market:
        info = await market.call(commands.WhoAmI)
    if info["fingerprint"] != pki.fingerprint(cert):
        raise CommandError("the market did not take the new certificate; the old one is in "
                           f"{home.file('cert.pem.old')}")
    home.forgetOldCertificate()
    print(f"account {info['name']} has a new certificate: serial {pki.serialHex(cert)},"
          f" sha256 {info['fingerprint']}; the old one is revoked")


def formatTable(rows):
    """Rows of cells as aligned text: the first column to the left, the rest to the right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def printListing(asJSON, items, emptyText, formatter):
    """A command's list: as JSON, as a table from C{formatter(items, now)}, or a note when empty."""
    if asJSON:
        print(json.dumps(items))
    elif not items:
        print(emptyText)
    else:
        print(formatter(items, time.time()))


def duration(seconds):
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


async def imageBuild(reactor, args, home):
    """Build a livecd ISO in a thread: it is big file and CPU work."""
    from twisted.internet import threads

    from cpushare.vm import livecd
    from cpushare.vm.isoimage import ImageError

    def note(message):
        reactor.callFromThread(print, f"  {message}", file=sys.stderr)

    if args.ssh_key and args.no_ssh_key:
        raise CommandError("--ssh-key and --no-ssh-key contradict each other: give one")
    keys = args.ssh_key
    if not keys and not args.no_ssh_key and args.base is None:
        keys = livecd.defaultKeyFiles()
        for path in keys:
            print(f"  adding your ssh key {path} (--no-ssh-key leaves it out)", file=sys.stderr)
    try:
        result = await threads.deferToThreadPool(
            reactor, reactor.getThreadPool(), livecd.build,
            args.output, args.add, args.base, args.cache, note, keys,
        )
    except ImageError as e:
        raise CommandError(str(e))
    for message in result.notes:
        print(f"cpushare: note: {message}", file=sys.stderr)
    print(f"wrote {result.path}: {result.description}")
    print(f"size {result.size / 1e6:.1f} MB, sha256 {result.sha256}")


def parser():
    p = argparse.ArgumentParser(prog="cpushare", description="Buy and sell CPU time on the CPUShare market.")
    p.add_argument("--home", help="account home folder (default $CPUSHARE_HOME or ~/.cpushare)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    r = sub.add_parser("register", help="create an account on a market")
    r.add_argument("--server", required=True, help="the market's HOST:PORT")
    r.add_argument("--ca", required=True, help="the market's CA certificate (ca.pem)")
    r.add_argument("--name", required=True, help="the account name to take")
    r.set_defaults(run=register)

    w = sub.add_parser("whoami", help="show this home's account")
    w.add_argument("--json", action="store_true")
    w.set_defaults(run=whoami)

    k = sub.add_parser("rekey", help="make a new key and certificate; the old one is revoked",
                       description="Make a new key here, have the market certify it over this "
                       "home's current connection, store both, and connect with them, which "
                       "revokes the old certificate. Running seller and buyer programs "
                       "reconnect with the new one.")
    k.set_defaults(run=rekey)

    image = sub.add_parser("image", help="build livecd images")
    images = image.add_subparsers(dest="image_command", metavar="ACTION")
    images.required = True
    b = images.add_parser(
        "build", help="build a bootable livecd ISO with your files inside",
        description="Build the reference livecd (a Debian kernel, a busybox system and the "
        "dropbear ssh server) with the files of each --add DIR at /cpushare/ in the guest, "
        "or add them to the bootable ISO --base. At boot the guest starts its ssh server "
        "(root, by public key only), takes an address by DHCP, prints CPUSHARE-READY on its "
        "serial console and runs /cpushare/start if it is executable.",
    )
    b.add_argument("-o", "--output", required=True, metavar="ISO", help="the ISO to write")
    b.add_argument("--add", action="append", default=[], metavar="DIR",
                   help="a folder whose files go to /cpushare/ (repeatable; later ones win)")
    b.add_argument("--ssh-key", action="append", default=[], metavar="FILE",
                   help="an OpenSSH public key file whose keys may log in to the VMs as root "
                   "(repeatable; default: your ~/.ssh/id_*.pub when building a new livecd)")
    b.add_argument("--no-ssh-key", action="store_true",
                   help="put no ssh key in the image, not even your ~/.ssh/id_*.pub")
    b.add_argument("--base", metavar="ISO",
                   help="add the files to this bootable ISO instead of a new reference livecd")
    b.add_argument("--cache", metavar="DIR",
                   help="where the Debian parts are kept (default $CPUSHARE_CACHE, "
                   "else $XDG_CACHE_HOME/cpushare or ~/.cache/cpushare)")
    b.set_defaults(run=imageBuild)

    from cpushare.client import marketcli, vmcli
    marketcli.addParsers(sub)
    vmcli.addImageParsers(images)
    vmcli.addParsers(sub)
    from cpushare.client import fundscli
    fundscli.addParsers(sub)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    home = Home(args.home or defaultHome())
    status = []

    async def run(reactor):
        try:
            await args.run(reactor, args, home)
        except (CommandError, ConnectError, HomeError) as e:
            print(f"cpushare: {e}", file=sys.stderr)
            status.append(1)

    def start(reactor):
        return defer.ensureDeferred(run(reactor))

    try:
        task.react(start)
    except SystemExit as e:
        if e.code:
            raise
    sys.exit(status[0] if status else 0)
