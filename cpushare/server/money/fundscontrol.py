"""
The control commands about money (docs/protocol.md): adding funds,
balances, statements, earnings and payouts.  A mixin of the server's
control protocol; the work is done by the market's
L{cpushare.server.money.desk.MoneyDesk}, whose records this module turns
into the commands' answers.
"""

import attr
from twisted.internet import defer
from twisted.protocols import amp

from cpushare.protocol import commands, paging
from cpushare.server.money.funds import formatPercent


def _pending(payment):
    """A payment waiting at PayPal, as an entry of C{Balance}'s C{pending}."""
    return {"payment": payment.paypal_id, "gross": payment.gross, "net": payment.net,
            "state": payment.state, "created": payment.created}


def _payoutLine(p):
    """A payout as an entry of C{Earnings}' C{payouts}, with PayPal's words clipped."""
    line = {"payout": p.id, "amount": p.amount, "email": p.email, "state": p.state,
            "created": p.created, "updated": p.updated}
    for key in ("paypal_status", "reason"):
        if getattr(p, key) is not None:
            line[key] = paging.clip(getattr(p, key))
    return line


class FundsCommands(amp.CommandLocator):
    """Responders for the money commands; C{self.session} is the market session."""

    def _money(self):
        account = self.session.requireHello()
        return account, self.session.market.money

    @commands.FundsAdd.responder
    def fundsAdd(self, amount):
        account, money = self._money()
        return defer.ensureDeferred(money.funds.addFunds(account, amount))

    @commands.Balance.responder
    def balance(self):
        account, money = self._money()
        return money.statements.balance(account).addCallback(
            lambda sheet: balanceAnswer(money, sheet))

    @commands.Statement.responder
    def statement(self, before=None):
        account, money = self._money()
        checkEntry(before)
        return money.statements.statement(account, before).addCallback(
            lambda page: statementAnswer(money, page))

    @commands.Earnings.responder
    def earnings(self):
        account, money = self._money()
        return money.statements.earnings(account).addCallback(
            lambda sheet: earningsAnswer(money, sheet))

    @commands.Payout.responder
    def payout(self, amount=None, email=None):
        account, money = self._money()
        return defer.ensureDeferred(requestPayout(money, account, amount, email))


# The answers, also the web site's (L{cpushare.server.site.api}).

def balanceAnswer(money, sheet):
    """C{Balance}'s answer from an account's L{statements.BalanceSheet}."""
    return {"funds": sheet.funds, "held": sheet.held, "earnings": sheet.earnings,
            "payout": sheet.payout, "pending": [_pending(p) for p in sheet.pending],
            "awaiting_verdicts": sheet.awaiting,
            "currency": money.currency, "payments": money.takesPayments,
            "commission_percent": formatPercent(money.commission)}


def checkEntry(before):
    """C{Statement}'s cursor: None or a ledger entry's number."""
    if before is not None and not 0 < before <= 2**62:
        raise commands.BadRequest("before must be a positive entry number")


def statementAnswer(money, page):
    """C{Statement}'s answer from a page of an account's statement: (entries, more)."""
    entries, more = page
    entries = [attr.asdict(e) for e in entries]
    fitted, cut = paging.pageOf(commands.Statement, "entries", entries, len(entries))
    return {"entries": fitted, "more": more or cut, "currency": money.currency}


def earningsAnswer(money, sheet):
    """C{Earnings}' answer from a seller's L{statements.EarningsSheet}."""
    result = {
        "earnings": sheet.earnings, "payout": sheet.payout,
        "awaiting_verdicts": sheet.awaiting, "currency": money.currency, "minimum": money.payoutMinimum,
        "payments": money.takesPayments,
        # The most recent few.
        "payouts": [_payoutLine(p) for p in sheet.payouts],
    }
    if sheet.email is not None:
        result["email"] = sheet.email
    return result


async def requestPayout(money, account, amount=None, email=None):
    """C{Payout}: pay out C{account}'s earnings; returns the command's answer."""
    p = await money.payouts.request(account, amount, email)
    return {"payout": p.id, "amount": p.amount, "email": p.email,
            "state": p.state, "currency": p.currency}
