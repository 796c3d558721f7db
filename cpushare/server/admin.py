"""
cpushare-admin: the operator's tool, working on the market's database.

    cpushare-admin [--data DIR | --db URL] accounts
    cpushare-admin [--data DIR | --db URL] delete-account NAME
    cpushare-admin [--data DIR | --db URL] suspend NAME [--reason TEXT] | unsuspend NAME
    cpushare-admin [--data DIR | --db URL] certificates [NAME]
    cpushare-admin [--data DIR | --db URL] revoke ACCOUNT|SERIAL|FINGERPRINT
    cpushare-admin [--data DIR | --db URL] books
    cpushare-admin [--data DIR | --db URL] credit NAME AMOUNT [--memo TEXT]
    cpushare-admin [--data DIR | --db URL] payments | payouts
    cpushare-admin [--data DIR | --db URL] payout-sent ID | payout-returned ID
    cpushare-admin [--data DIR | --db URL] credit-payment PAYPAL_ID
    cpushare-admin [--data DIR | --db URL] web-admin NAME [--remove]
    cpushare-admin [--data DIR | --db URL] tpm-policy [add|remove KIND DIGEST | any-firmware yes|no]
    cpushare-admin [--data DIR | --db URL] tpm-sellers | tpm-forget NAME

The database is the server's: the SQLite file market.sqlite in --data, or
the one --db names (the same URL as the server's --db).

`web-admin` makes an account an administrator of the web site (its
operator's pages under /admin), or no longer one with --remove.

`tpm-policy` shows the trusted computing policy: the digests a TPM quote's
event log may show, by kind (firmware, kernel, qemu, client: what booted
the seller's computer, the QEMU program and the seller's client), and
whether any firmware and kernel may pass; `add` and `remove` change it, and
the running market checks every later quote against it.  `tpm-sellers`
lists the enrolled TPM attestation keys, their accounts and how their last
attestation went; `tpm-forget` forgets an account's keys, so that its
seller enrols again (after `cpushare rekey`, or a new TPM).  A seller
prints the client and QEMU lines to add (`python -m
cpushare.client.seller.trusted --qemu PATH`); the boot chain's digests are
in its TCG event log (docs/operator.md, "Trusted computing").

`books` proves the ledger: every entry summed is zero, every transaction
balances, no owner's account is below zero, and the leases agree with it
(each buyer's held funds are what its leases hold, each seller's pending
earnings what its leases say waits for a verdict).  It exits 0 when they
hold and 2 when they do not.

`payout-sent` and `payout-returned` settle a payout whose outcome the
market could not learn from PayPal (state unknown, or pending for good),
once the operator has looked it up at PayPal; `credit-payment` credits a payment PayPal
completed that the market could not (state check).  Each is posted once,
with the same ledger references the server uses.

It opens the database directly, which both SQLite and PostgreSQL allow
while the server runs.  Deleting or suspending an account, or revoking a
certificate, is recorded for the running server too: it closes the
connections concerned within its --access-check (1 s by default), and
refuses them at every later handshake.
"""

import argparse
import os
import sys

from cpushare.server.db import database
from cpushare.server.money import ledger
from cpushare.server.money.billing import checkBooks
from cpushare.server.db import store, tpmsql, websql


def main(argv=None):
    p = argparse.ArgumentParser(prog="cpushare-admin", description="Operate a CPUShare market.")
    p.add_argument("--data", default="cpushare-data", help="the server's data folder")
    p.add_argument("--db", metavar="URL",
                   help="the market's database, as the server's --db: postgresql://USER@HOST/NAME"
                        " or sqlite:///PATH (default: market.sqlite in --data)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser("accounts", help="list the accounts")
    d = sub.add_parser("delete-account", help="delete an account; its certificate stops working")
    d.add_argument("name")
    su = sub.add_parser("suspend", help="suspend an account: its connections close, "
                        "its certificates are refused until unsuspend")
    su.add_argument("name")
    su.add_argument("--reason", help="told to the account's programs when they connect")
    un = sub.add_parser("unsuspend", help="let a suspended account connect again")
    un.add_argument("name")
    ce = sub.add_parser("certificates", help="list the certificates (of one account)")
    ce.add_argument("name", nargs="?")
    rv = sub.add_parser("revoke", help="revoke an account's certificates, or one certificate "
                        "by its serial number or SHA-256 fingerprint")
    rv.add_argument("what", metavar="ACCOUNT|SERIAL|FINGERPRINT")
    sub.add_parser("books", help="prove the ledger sums to zero")
    c = sub.add_parser("credit", help="give an account funds from the market's own money "
                       "(a refund, trial credit)")
    c.add_argument("name")
    c.add_argument("amount", help="like 5 or 12.50")
    c.add_argument("--memo", default="credit from the market")
    sub.add_parser("payments", help="list the PayPal payments buyers created")
    sub.add_parser("payouts", help="list the sellers' PayPal payouts")
    for name, what in (("payout-sent", "PayPal paid it"),
                       ("payout-returned", "PayPal did not pay it: back to the earnings")):
        s = sub.add_parser(name, help=f"settle a payout by hand: {what}")
        s.add_argument("payout", type=int)
    cp = sub.add_parser("credit-payment",
                        help="credit a payment PayPal completed that the market could not")
    cp.add_argument("paypal_id")
    wa = sub.add_parser("web-admin", help="let an account see the web site's operator pages")
    wa.add_argument("name")
    wa.add_argument("--remove", action="store_true", help="no longer an administrator")
    tp = sub.add_parser("tpm-policy", help="show or change the trusted computing policy",
                        epilog="A seller prints its client and QEMU digests as these lines:"
                        " python -m cpushare.client.seller.trusted --qemu PATH")
    tp.add_argument("action", nargs="?", default="list",
                    choices=("list", "add", "remove", "any-firmware"))
    tp.add_argument("values", nargs="*", metavar="KIND DIGEST | yes|no")
    sub.add_parser("tpm-sellers", help="list the sellers' enrolled TPM attestation keys")
    tf = sub.add_parser("tpm-forget", help="forget an account's TPM keys: its seller enrols"
                        " again")
    tf.add_argument("name")
    args = p.parse_args(argv)
    try:
        return run(args)
    except Refused as e:
        print(f"cpushare-admin: {e}", file=sys.stderr)
        return 1


class Refused(Exception):
    """What the operator asked cannot be done; the message says why."""


def run(args):
    try:
        db = database.fromURL(args.db or os.path.join(args.data, "market.sqlite"))
    except database.BadURL as e:
        raise Refused(f"--db: {e}")
    if isinstance(db, database.SQLite) and not os.path.exists(db.path):
        raise Refused(f"no market database at {db.path}")
    try:
        conn = db.connect()
    except database.Unavailable as e:
        raise Refused(str(e))
    try:
        store.transact(conn, store.migrate)
        if args.command == "accounts":
            for a in store.transact(conn, store.listAccounts):
                state = (f"deleted {a['deleted']}" if a["deleted"] else
                         f"suspended {a['suspended']}" if a["suspended"] else "active")
                print(f"{a['id']:>6}  {a['name']:<32}  created {a['created']}  {state}")
        elif args.command == "delete-account":
            if not store.transact(conn, store.deleteAccount, args.name):
                raise Refused(f"no active account named {args.name!r}")
            print(f"deleted account {args.name}")
        elif args.command in ("suspend", "unsuspend", "certificates", "revoke"):
            return access(conn, args)
        elif args.command == "credit":
            try:
                amount = ledger.parseAmount(args.amount, maximum=CREDIT_MAX)
            except ledger.BadAmount as e:
                raise Refused(str(e))
            try:
                store.transact(conn, credit, args.name, amount, args.memo)
            except LookupError as e:
                raise Refused(str(e))
            print(f"credited {ledger.formatAmount(amount)} to {args.name}")
        elif args.command == "books":
            return printBooks(store.transact(conn, checkBooks))
        elif args.command in ("tpm-policy", "tpm-sellers", "tpm-forget"):
            trusted(conn, args)
        elif args.command == "web-admin":
            if not store.transact(conn, websql.setWebAdmin, args.name, not args.remove):
                raise Refused(f"no account named {args.name!r}")
            print(f"account {args.name} is {'no longer ' if args.remove else ''}"
                  "an administrator of the web site")
        else:
            return money(conn, args)
    except database.Unavailable as e:
        raise Refused(str(e))
    finally:
        conn.close()
    return 0


def trusted(conn, args):
    """The trusted computing policy and the enrolled sellers."""
    if args.command == "tpm-forget":
        n = store.transact(conn, tpmsql.forget, args.name)
        if not n:
            raise Refused(f"account {args.name!r} has no TPM key enrolled")
        print(f"forgot {n} TPM key{'s' if n > 1 else ''} of {args.name}: its seller enrols"
              " again when it next connects")
        return
    if args.command == "tpm-sellers":
        for k in store.transact(conn, tpmsql.enrolled):
            print(f"{k['account']:<32}  key {k['ak_name'][:16]}  enrolled {k['enrolled']}"
                  f"  by {k['ek_issuer']}")
            print(f"{'':<32}  last: {k['last_result'] or 'never attested'}")
        return
    action, values = args.action, args.values
    if action == "any-firmware":
        if values not in (["yes"], ["no"]):
            raise Refused("tpm-policy any-firmware takes yes or no")
        store.transact(conn, tpmsql.setAnyFirmware, values == ["yes"])
        print("any firmware and kernel may pass" if values == ["yes"] else
              "only the firmware and kernel digests listed pass")
    elif action in ("add", "remove"):
        if len(values) != 2:
            raise Refused(f"tpm-policy {action} takes a kind and a digest")
        kind, digest = values[0], values[1].lower()
        if kind not in tpmsql.KINDS:
            raise Refused(f"{kind!r} is not a kind: {', '.join(tpmsql.KINDS)}")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise Refused(f"{values[1]!r} is not a sha256 digest (64 hexadecimal digits)")
        fn = tpmsql.allow if action == "add" else tpmsql.disallow
        if not store.transact(conn, fn, kind, digest):
            raise Refused(f"{kind} {digest} is {'already' if action == 'add' else 'not'}"
                          " allowed")
        print(f"{'allowed' if action == 'add' else 'no longer allowed'}: {kind} {digest}")
    elif values:
        raise Refused("tpm-policy list takes nothing more")
    policy = store.transact(conn, tpmsql.policy)
    for kind in tpmsql.KINDS:
        allowed = policy[kind]
        anyOne = kind in ("firmware", "kernel") and policy[tpmsql.ALLOW_ANY_FIRMWARE]
        print(f"{kind}: {'any' if anyOne else ', '.join(allowed) or 'none allowed'}")


def access(conn, args):
    """Suspension and certificates."""
    if args.command == "suspend":
        if args.reason is not None and len(args.reason) > store.MAX_SUSPEND_REASON:
            raise Refused(f"a reason is at most {store.MAX_SUSPEND_REASON} characters")
        if not store.transact(conn, store.suspendAccount, args.name, args.reason):
            raise Refused(f"no active, unsuspended account named {args.name!r}")
        print(f"suspended account {args.name}")
    elif args.command == "unsuspend":
        if not store.transact(conn, store.unsuspendAccount, args.name):
            raise Refused(f"no suspended account named {args.name!r}")
        print(f"account {args.name} may connect again")
    elif args.command == "certificates":
        for c in store.transact(conn, store.listCertificates, args.name):
            state = f"revoked {c['revoked']}" if c["revoked"] else "valid"
            print(f"{c['account']:<32}  serial {c['serial'] or '-':<40}  "
                  f"sha256 {c['fingerprint']}  issued {c['issued']}  {state}")
    elif args.command == "revoke":
        try:
            revoked = store.transact(conn, store.revoke, args.what)
        except LookupError as e:
            raise Refused(str(e))
        for name, fingerprint, serial in revoked:
            print(f"revoked the certificate of {name}: serial {serial or '-'},"
                  f" sha256 {fingerprint}")
    return 0


CREDIT_MAX = 100_000 * ledger.MICRO


def credit(cursor, name, amount, memo):
    """Grant C{amount} of the market's money to the active account C{name}."""
    cursor.execute("SELECT id FROM accounts WHERE name = ? AND deleted IS NULL", (name,))
    row = cursor.fetchone()
    if row is None:
        raise LookupError(f"no active account named {name!r}")
    return ledger.post(cursor, "credit", memo,
                       [(ledger.GRANTS, None, -amount), (ledger.FUNDS, row[0], amount)])


def money(conn, args):
    """The commands about PayPal payments and payouts."""
    from cpushare.server.money import funds, payouts

    fmt = ledger.formatAmount
    if args.command == "payments":
        for p in store.transact(conn, funds.listPayments):
            print(f"{p.id:>6}  {p.paypal_id:<28}  {p.account:<16}"
                  f"  {fmt(p.gross):>10} {p.currency}  commission {fmt(p.commission):>8}"
                  f"  {p.state:<10}  {p.updated}  {p.reason or ''}".rstrip())
        return 0
    if args.command == "payouts":
        for p in store.transact(conn, payouts.listPayouts):
            print(f"{p.id:>6}  {p.account:<16}  {p.email:<28}"
                  f"  {fmt(p.amount):>10} {p.currency}  {p.state:<8}"
                  f"  batch {p.batch_id or '-':<14}  {p.paypal_status or '-':<20}"
                  f"  {p.updated}  {p.reason or ''}".rstrip())
        return 0
    if args.command in ("payout-sent", "payout-returned"):
        outcome = args.command.split("-")[1]
        found = store.transact(conn, payouts.payout, args.payout)
        if found is None:
            raise Refused(f"there is no payout {args.payout}")
        if found.state not in ("unknown", "pending"):
            raise Refused(f"payout {args.payout} is {found.state} already")
        store.transact(conn, payouts.settlePayout, args.payout, outcome, None,
                       "settled by the operator", "the operator")
        print(f"payout {args.payout} {outcome}: {fmt(found.amount)} {found.currency}")
        return 0
    if args.command == "credit-payment":
        payment = store.transact(conn, funds.paymentByPayPalId, args.paypal_id)
        if payment is None or payment.state != "check":
            state = "unknown" if payment is None else payment.state
            raise Refused(f"payment {args.paypal_id} is {state}; only payments in "
                          "state check are credited by hand")
        store.transact(conn, funds.creditPayment, payment.id, payment.payer_id,
                       ("check",))
        print(f"credited payment {args.paypal_id}: "
              f"{fmt(payment.net)} {payment.currency} to the "
              f"funds of {payment.account}")
        return 0
    raise AssertionError(args.command)


def printBooks(report):
    fmt = ledger.formatAmount
    print(f"transactions: {report['transactions']}, entries: {report['entries']}")
    for kind, amount in sorted(report["byKind"].items()):
        print(f"  {kind:<12} {fmt(amount):>18}")
    print(f"  {'sum':<12} {fmt(report['total']):>18}")
    for transactionId, amount in report["unbalanced"]:
        print(f"UNBALANCED transaction {transactionId}: sums to {fmt(amount)}")
    for name, amount in report["negative"]:
        print(f"NEGATIVE {name}: {fmt(amount)}")
    for name, kept, summed in report["drift"]:
        print(f"DRIFT {name}: its balance says {fmt(kept)}, its entries sum to {fmt(summed)}")
    for owner, kept, leases in report.get("held", ()):
        print(f"HELD account {owner}: its held funds are {fmt(kept)},"
              f" its leases hold {fmt(leases)}")
    for owner, kept, leases in report.get("pending", ()):
        print(f"PENDING account {owner}: its pending earnings are {fmt(kept)},"
              f" its leases await verdicts on {fmt(leases)}")
    if report["ok"]:
        print("the books balance: every entry sums to zero")
        return 0
    print("THE BOOKS DO NOT BALANCE")
    return 2


if __name__ == "__main__":
    sys.exit(main())
