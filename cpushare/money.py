"""
Money: integer micro-units (millionths) of the market's one currency.

Floats never touch money.  Amounts are read from and written as decimal
strings here, on both sides of the wire; the ledger
(L{cpushare.server.money.ledger}) moves them.
"""

import re

MICRO = 1_000_000
CENT = MICRO // 100

# Largest amount a single entry may carry: a billion units.  Anything
# larger is a mistake, not money.
MAX_AMOUNT = 10**9 * MICRO

# The largest price a core-hour, or fee a GB, a seller may ask: 1000.00.
# Beyond it is a typo.
MAX_PRICE = 1000 * MICRO


class BadAmount(ValueError):
    pass


_AMOUNT = re.compile(r"^(\d{1,10})(?:\.(\d{1,6}))?$")


def parseAmount(text, maximum=MAX_AMOUNT, allowZero=False):
    """
    "20", "20.5" or "0.000001" as micro-units.  Signs, exponents, more than
    six decimals, zero (unless C{allowZero}) and anything over C{maximum}
    are refused with L{BadAmount} naming the problem.
    """
    text = str(text).strip()
    match = _AMOUNT.match(text)
    if match is None:
        raise BadAmount(
            f"{text!r} is not an amount: write a positive number with at most"
            " six decimals, like 20 or 12.50"
        )
    whole, fraction = match.group(1), match.group(2) or ""
    micro = int(whole) * MICRO + int(fraction.ljust(6, "0"))
    if micro == 0 and not allowZero:
        raise BadAmount(f"{text!r} is zero")
    if micro > maximum:
        raise BadAmount(f"{text} is more than the largest amount allowed, {formatAmount(maximum)}")
    return micro


def formatAmount(micro):
    """Micro-units as a decimal string: cents always, more digits only when present."""
    if isinstance(micro, bool) or not isinstance(micro, int):
        raise TypeError(f"amounts are integers of micro-units, not {type(micro).__name__}")
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), MICRO)
    digits = f"{fraction:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{digits}"


def cpuCost(price, cpuSeconds):
    """C{cpuSeconds} at C{price} a core-hour, rounded down to the micro-unit."""
    return int(cpuSeconds * 1000) * price // 3_600_000


def netCost(netFee, netBytes):
    """C{netBytes} at C{netFee} a GB, rounded down to the micro-unit."""
    return netBytes * netFee // 10**9


def cost(price, netFee, cpuSeconds, netBytes):
    """The cost of C{cpuSeconds} and C{netBytes}: each rounded down, then summed."""
    return cpuCost(price, cpuSeconds) + netCost(netFee, netBytes)
