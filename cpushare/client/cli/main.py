"""
cpushare: the command line for buyers and sellers, one module a command group.

    cpushare [--home H] register|whoami|rekey           (account.py)
    cpushare image build|upload|list                    (images.py)
    cpushare sellers, terms, leases, rate               (market.py)
    cpushare order place|cancel, vms, vm stop, console  (vms.py)
    cpushare funds add, balance, statement, earnings, payout (funds.py)
    cpushare web [password]                             (web.py)

Every failure is one line on stderr, naming the problem, and exit status 1.
"""

import argparse
import sys

from twisted.internet import defer, task

from cpushare.client.cli import account, funds, images, market, vms, web
from cpushare.client.cli.connection import CommandError
from cpushare.client.home import Home, HomeError, defaultHome
from cpushare.client.session import ConnectError


def parser():
    p = argparse.ArgumentParser(prog="cpushare", description="Buy and sell CPU time on the CPUShare market.")
    p.add_argument("--home", help="account home folder (default $CPUSHARE_HOME or ~/.cpushare)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    for group in (account, images, market, vms, funds, web):
        group.addParsers(sub)
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
