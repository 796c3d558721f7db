"""
cpushare-admin: the operator's tool, working on the server's data folder.

    cpushare-admin --data DIR accounts
    cpushare-admin --data DIR delete-account NAME

It opens the database directly (SQLite allows it while the server runs).
A deleted account's certificate is refused at its next connection.
"""

import argparse
import os
import sys

from cpushare.server import store


def main(argv=None):
    p = argparse.ArgumentParser(prog="cpushare-admin", description="Operate a CPUShare market.")
    p.add_argument("--data", default="cpushare-data", help="the server's data folder")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser("accounts", help="list the accounts")
    d = sub.add_parser("delete-account", help="delete an account; its certificate stops working")
    d.add_argument("name")
    args = p.parse_args(argv)

    path = os.path.join(args.data, "market.sqlite")
    if not os.path.exists(path):
        print(f"cpushare-admin: no market database at {path}", file=sys.stderr)
        return 1
    conn = store.connect(path)
    try:
        store.transact(conn, store.migrate)
        if args.command == "accounts":
            for a in store.transact(conn, store.listAccounts):
                state = f"deleted {a['deleted']}" if a["deleted"] else "active"
                print(f"{a['id']:>6}  {a['name']:<32}  created {a['created']}  {state}")
        elif args.command == "delete-account":
            if not store.transact(conn, store.deleteAccount, args.name):
                print(f"cpushare-admin: no active account named {args.name!r}", file=sys.stderr)
                return 1
            print(f"deleted account {args.name}")
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
