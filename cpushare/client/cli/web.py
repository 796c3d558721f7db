"""
The market's web site, reached from this account's certificate.

    cpushare [--home H] web [--no-open]     a one-time login link: printed, and opened
    cpushare [--home H] web password        set the site's password (asked twice on a
                                            terminal, else one line of standard input)

The link logs the account in once, within five minutes, without a
password; the password is for logging in from anywhere by name.
"""

import getpass
import sys
import webbrowser

from cpushare.client.cli.connection import CommandError
from cpushare.client.cli.output import ask, command
from cpushare.protocol import commands


async def link(reactor, args, home):
    answer = await ask(reactor, home, commands.WebLoginLink)
    url = answer["url"]
    print("log in to the market's web site (once, within 5 minutes) at:")
    print(f"  {url}")
    if not args.no_open:
        webbrowser.open(url)


def readPassword(stdin=None):
    """The new password: typed twice on a terminal, else the first line of C{stdin}."""
    stdin = stdin or sys.stdin
    if not stdin.isatty():
        return stdin.readline().rstrip("\r\n")
    password = getpass.getpass("new web password (at least 10 characters): ")
    if getpass.getpass("the same again: ") != password:
        raise CommandError("the two passwords differ; nothing was changed")
    return password


async def password(reactor, args, home):
    # Read before connecting: nothing else runs while the user types.
    await ask(reactor, home, commands.SetWebPassword, password=readPassword())
    print(f"the web password of account {home.config.get('name')} is set; browsers "
          "logged in before are logged out")


def addParsers(sub):
    w = command(sub, "web", link, help="log in to the market's web site",
                description="Print a link that logs this account in to the market's web "
                "site once, within 5 minutes, and open it in a browser.")
    w.add_argument("--no-open", action="store_true", help="print the link only")
    acts = w.add_subparsers(dest="web_command", metavar="ACTION")
    p = acts.add_parser("password", help="set the password for logging in by name",
                        description="Set this account's password for the web site "
                        "(at least 10 characters). On a terminal it is asked twice; "
                        "otherwise the first line of standard input is the password.")
    p.set_defaults(run=password)
