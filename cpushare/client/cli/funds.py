"""
The commands about money:

    cpushare funds add AMOUNT [--json]     a PayPal payment to approve, then funds
    cpushare balance [--json]              funds, held, earnings (and those awaiting
                                           verdicts), payments waiting
    cpushare statement [--json]            every movement, newest first
    cpushare earnings [--json]             a seller's earnings and payouts
    cpushare payout [AMOUNT] [--email ADDR] [--json]

Amounts are typed as decimals ("20", "12.50") and travel as integer
micro-units; they are shown with cents, and more digits only when an
amount has them.
"""

import json

from cpushare.client.cli.connection import CommandError, Connection
from cpushare.client.cli.output import actions, ask, command, formatTable, printedAsJSON
from cpushare.money import BadAmount, formatAmount, parseAmount
from cpushare.protocol import commands


def _amount(text):
    try:
        return parseAmount(text)
    except BadAmount as e:
        raise CommandError(str(e))


async def fundsAdd(reactor, args, home):
    amount = _amount(args.amount)
    added = await ask(reactor, home, commands.FundsAdd, amount=amount)
    if printedAsJSON(args, added):
        return
    cur = added["currency"]
    print(f"adding {formatAmount(added['gross'])} {cur} with PayPal: the market's commission "
          f"is {formatAmount(added['commission'])} ({added['commission_percent']}%), so "
          f"{formatAmount(added['net'])} {cur} goes to your funds")
    print(f"approve payment {added['payment']} at PayPal:")
    print(f"  {added['approval_url']}")
    print("PayPal then brings you back to the market, which adds the funds; "
          "'cpushare balance' shows them")


async def balance(reactor, args, home):
    sheet = await ask(reactor, home, commands.Balance)
    if printedAsJSON(args, sheet):
        return
    cur = sheet["currency"]
    rows = [
        ("funds", formatAmount(sheet["funds"]), cur, "to spend"),
        ("held", formatAmount(sheet["held"]), cur, "held for your running VMs"),
        ("earnings", formatAmount(sheet["earnings"]), cur, "earned selling; 'cpushare payout'"),
    ]
    if sheet.get("awaiting_verdicts"):
        rows.append(("awaiting", formatAmount(sheet["awaiting_verdicts"]), cur,
                     "earned with replicated runs, awaiting verdicts"))
    if sheet["payout"]:
        rows.append(("payout", formatAmount(sheet["payout"]), cur, "on its way to you"))
    width = max(len(r[1]) for r in rows)
    for name, amount, currency, note in rows:
        print(f"{name + ':':<10} {amount:>{width}} {currency}   {note}")
    for p in sheet["pending"]:
        print(f"payment {p['payment']} of {formatAmount(p['gross'])} {cur} ({p['created']}): "
              + _pendingNote(p["state"]))
    if sheet["payments"]:
        print(f"this market's commission on funds added: {sheet['commission_percent']}%")
    else:
        print("this market takes no payments")


def _pendingNote(state):
    return {
        "created": "waiting for your approval at PayPal",
        "executing": "being completed",
        "check": "waiting for the market's operator",
        "mismatch": "PayPal's answer did not match it; the operator has been told",
    }.get(state, state)


async def statement(reactor, args, home):
    entries = []
    async with Connection(reactor, home) as market:
        before = None
        while True:
            kw = {} if before is None else {"before": before}
            page = await market.call(commands.Statement, **kw)
            entries.extend(page["entries"])
            currency = page["currency"]
            if not page["more"] or not page["entries"]:
                break
            before = page["entries"][-1]["entry"]
    if args.json:
        print(json.dumps({"currency": currency, "entries": entries}))
        return
    if not entries:
        print("no movements yet: 'cpushare funds add AMOUNT' adds funds")
        return
    print(formatStatement(entries, currency))


def formatStatement(entries, currency):
    rows = [("TIME", "KIND", "ACCOUNT", f"AMOUNT ({currency})", "BALANCE", "MEMO")]
    for e in entries:
        amount = formatAmount(e["amount"])
        rows.append((e["time"], e["kind"], e["account"],
                     amount if e["amount"] < 0 else "+" + amount,
                     formatAmount(e["balance"]), e["memo"]))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].ljust(widths[2]),
                 r[3].rjust(widths[3]), r[4].rjust(widths[4]), r[5]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


async def earnings(reactor, args, home):
    sheet = await ask(reactor, home, commands.Earnings)
    if printedAsJSON(args, sheet):
        return
    cur = sheet["currency"]
    print(f"earnings:        {formatAmount(sheet['earnings'])} {cur}")
    if sheet.get("awaiting_verdicts"):
        print(f"awaiting:        {formatAmount(sheet['awaiting_verdicts'])} {cur} (replicated "
              "runs awaiting verdicts: paid once their results are accepted)")
    print(f"on the way:      {formatAmount(sheet['payout'])} {cur} (payouts PayPal has not "
          "finished)")
    print(f"payout minimum:  {formatAmount(sheet['minimum'])} {cur}")
    print(f"payout email:    {sheet.get('email') or '(none yet: cpushare payout --email ADDR)'}")
    if not sheet["payments"]:
        print("this market takes no payments, and pays none out")
    if sheet["payouts"]:
        rows = [("PAYOUT", "AMOUNT", "EMAIL", "STATE", "REQUESTED", "NOTE")]
        for p in sheet["payouts"]:
            rows.append((str(p["payout"]), formatAmount(p["amount"]), p["email"], p["state"],
                         p["created"], p.get("reason") or p.get("paypal_status") or ""))
        print()
        print(formatTable(rows))


async def payout(reactor, args, home):
    kw = {}
    if args.amount is not None:
        kw["amount"] = _amount(args.amount)
    if args.email is not None:
        kw["email"] = args.email
    answer = await ask(reactor, home, commands.Payout, **kw)
    if printedAsJSON(args, answer):
        return
    what = f"payout {answer['payout']}: {formatAmount(answer['amount'])} {answer['currency']}"
    if answer["state"] == "unknown":
        print(f"{what} to {answer['email']}: the market could not tell whether PayPal took "
              "it; it stays out of your earnings until the market's operator has checked "
              "with PayPal")
        return
    print(f"{what} to {answer['email']} is with PayPal; 'cpushare earnings' shows when it "
          "has been paid")


def addParsers(sub):
    fundsActions = actions(sub, "funds", "add funds with PayPal")
    add = command(
        fundsActions, "add", fundsAdd, json=True, help="pay AMOUNT with PayPal into your funds",
        description="Create a PayPal payment of AMOUNT in the market's currency and print "
        "the link where you approve it. The market's commission and what reaches your funds "
        "are shown first. Your funds grow once PayPal brings you back to the market.")
    add.add_argument("amount", help="like 20 or 12.50 (whole cents)")

    command(sub, "balance", balance, json=True, help="show your funds, held money and earnings")

    command(sub, "statement", statement, json=True, help="list every movement of your money")

    command(sub, "earnings", earnings, json=True, help="show your earnings and payouts (sellers)")

    p = command(
        sub, "payout", payout, json=True, help="pay your earnings out with PayPal (sellers)",
        description="Pay AMOUNT of your earnings (all of them when left out) to your PayPal "
        "account. The first payout needs --email; the address is remembered.")
    p.add_argument("amount", nargs="?", help="like 25 or 12.50 (default: all your earnings)")
    p.add_argument("--email", help="the email address of your PayPal account")
