"""
What the commands print (tables, listings, durations, JSON), the amounts
typed in, and the small pieces every command group declares itself with.
"""

import json
import time

from cpushare.client.cli.connection import CommandError, Connection
from cpushare.money import MAX_PRICE, BadAmount, parseAmount


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


def amount(text, what, allowZero=False):
    try:
        return parseAmount(text, maximum=MAX_PRICE, allowZero=allowZero)
    except BadAmount as e:
        raise CommandError(f"{what}: {e}")


def command(parent, name, run, json=False, **kw):
    """Declare the command C{name} under C{parent}, run by C{run}, with C{--json} when asked."""
    p = parent.add_parser(name, **kw)
    if json:
        p.add_argument("--json", action="store_true", help="print the answer as JSON")
    p.set_defaults(run=run)
    return p


def actions(parent, name, help):
    """Declare the command C{name}, whose ACTION (one of those added to the result) is required."""
    p = parent.add_parser(name, help=help)
    acts = p.add_subparsers(dest=f"{name}_command", metavar="ACTION")
    acts.required = True
    return acts


async def ask(reactor, home, command, **kw):
    """One call of C{command} on a connection of its own."""
    async with Connection(reactor, home) as market:
        return await market.call(command, **kw)


def printedAsJSON(args, value):
    """With --json, print C{value} as JSON and say so."""
    if args.json:
        print(json.dumps(value))
    return args.json
