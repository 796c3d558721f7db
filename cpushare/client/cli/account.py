"""
The account's commands.

    cpushare [--home H] register --server HOST:PORT --ca ca.pem --name NAME
    cpushare [--home H] whoami [--json]
    cpushare [--home H] rekey
"""

import json

from cpushare import pki
from cpushare.client.cli.connection import CommandError, Connection, call, close
from cpushare.client.cli.output import ask, command
from cpushare.client.home import HomeError, parseServer
from cpushare.client.session import connectOnce, endpointFor
from cpushare.protocol import commands


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
        result = await call(session, commands.Register, host, port, name=args.name, csr=csr)
    finally:
        await close(session)
    home.saveRegistration(f"{host}:{port}", args.name, result["account_id"],
                          caPEM, result["certificate"])
    print(f"registered account {args.name} (id {result['account_id']}) "
          f"at {host}:{port}; credentials in {home.path}")


async def whoami(reactor, args, home):
    async with Connection(reactor, home) as market:
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
    answer = await ask(reactor, home, commands.Rekey, csr=pki.makeRequest(key, name))
    certPEM = answer["certificate"]
    try:
        cert = pki.loadCertificate(certPEM)
    except ValueError:
        raise CommandError("the market answered with a certificate that does not parse")
    home.saveNewCertificate(key, certPEM)
    info = await ask(reactor, home, commands.WhoAmI)
    if info["fingerprint"] != pki.fingerprint(cert):
        raise CommandError("the market did not take the new certificate; the old one is in "
                           f"{home.file('cert.pem.old')}")
    home.forgetOldCertificate()
    print(f"account {info['name']} has a new certificate: serial {pki.serialHex(cert)},"
          f" sha256 {info['fingerprint']}; the old one is revoked")


def addParsers(sub):
    r = command(sub, "register", register, help="create an account on a market")
    r.add_argument("--server", required=True, help="the market's HOST:PORT")
    r.add_argument("--ca", required=True, help="the market's CA certificate (ca.pem)")
    r.add_argument("--name", required=True, help="the account name to take")

    command(sub, "whoami", whoami, json=True, help="show this home's account")

    command(sub, "rekey", rekey, help="make a new key and certificate; the old one is revoked",
            description="Make a new key here, have the market certify it over this "
            "home's current connection, store both, and connect with them, which "
            "revokes the old certificate. Running seller and buyer programs "
            "reconnect with the new one.")
