"""
Long lists on the control channel, one page at a time.

A list answer is one AMP value, and an AMP value holds at most 65,535
bytes, so no list command answers with a whole list: each answers with a
page of at most a set number of entries and at most PAGE_BYTES bytes as
encoded on the wire, and says whether more follow.  The client asks again
with a cursor (the last entry's id, or an offset where the command says so)
until none remain.  Free-form text that a peer chose (a stop reason, a
memo) is clipped to MAX_TEXT characters in lists, so that every single
entry fits a page with room to spare.
"""

PAGE_BYTES = 60000   # below AMP's 65,535-byte value limit, for the box around it
MAX_TEXT = 200       # characters of free-form text shown in a list entry
AMP_MAX_VALUE = 0xFFFF


def clip(text, limit=MAX_TEXT):
    """C{text} cut to C{limit} characters (None stays None)."""
    if text is None or len(text) <= limit:
        return text
    return text[:limit - 1] + "\u2026"


def listArgument(command, name):
    """The AmpList argument C{name} of C{command}'s response."""
    for key, argument in command.response:
        if key == name.encode("ascii"):
            return argument
    raise KeyError(f"{command.__name__} answers with no {name!r}")


def entrySize(argument, entry):
    """The bytes C{entry} takes in the AmpList C{argument} on the wire."""
    return len(argument.toStringProto([entry], None))


def fitPage(entries, argument, budget=PAGE_BYTES):
    """
    The longest leading part of C{entries} whose encoding as the AmpList
    C{argument} fits in C{budget} bytes (at least one entry when there is
    one: callers keep every entry far below the budget).
    """
    used = 0
    for count, entry in enumerate(entries):
        used += entrySize(argument, entry)
        if used > budget and count:
            return entries[:count]
    return entries


def pageOf(command, name, rows, limit, budget=PAGE_BYTES):
    """
    C{(page, more)}: the leading part of C{rows} that fits one page of
    C{command}'s list C{name} (at most C{limit} entries), and whether rows
    were left over.  Callers fetch C{limit + 1} rows, so that C{more} also
    says whether rows are left in the database.
    """
    page = fitPage(rows[:limit], listArgument(command, name), budget)
    return page, len(page) < len(rows)
