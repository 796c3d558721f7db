"""
Rows of the money room's tables that belong to an account, read as typed
records whose fields are the table's columns, in order, then C{account},
the account's name.
"""

import attr


def accountRows(cursor, record, table, rest, args):
    """
    The C{record}s of the rows of C{table} (as C{p}, joined with its
    account as C{a}) that C{rest} (a WHERE, ORDER BY or LIMIT clause) selects.
    """
    columns = ", ".join(f"p.{f.name}" for f in attr.fields(record) if f.name != "account")
    cursor.execute(f"SELECT {columns}, a.name FROM {table} p"
                   " JOIN accounts a ON a.id = p.account_id" + rest, args)
    return [record(*row) for row in cursor.fetchall()]
