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

        def answer(sheet):
            return {"funds": sheet.funds, "held": sheet.held, "earnings": sheet.earnings,
                    "payout": sheet.payout, "pending": [_pending(p) for p in sheet.pending],
                    "awaiting_verdicts": sheet.awaiting,
                    "currency": money.currency, "payments": money.takesPayments,
                    "commission_percent": formatPercent(money.commission)}

        return money.statements.balance(account).addCallback(answer)

    @commands.Statement.responder
    def statement(self, before=None):
        account, money = self._money()
        if before is not None and not 0 < before <= 2**62:
            raise commands.BadRequest("before must be a positive entry number")

        def answer(page):
            entries, more = page
            entries = [attr.asdict(e) for e in entries]
            fitted, cut = paging.pageOf(commands.Statement, "entries", entries, len(entries))
            return {"entries": fitted, "more": more or cut, "currency": money.currency}

        return money.statements.statement(account, before).addCallback(answer)

    @commands.Earnings.responder
    def earnings(self):
        account, money = self._money()

        def answer(sheet):
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

        return money.statements.earnings(account).addCallback(answer)

    @commands.Payout.responder
    def payout(self, amount=None, email=None):
        account, money = self._money()

        async def request():
            p = await money.payouts.request(account, amount, email)
            return {"payout": p.id, "amount": p.amount, "email": p.email,
                    "state": p.state, "currency": p.currency}

        return defer.ensureDeferred(request())
