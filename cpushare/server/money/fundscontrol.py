"""
The control commands about money (docs/protocol.md): adding funds,
balances, statements, earnings and payouts.  A mixin of the server's
control protocol; the work is done by the market's L{Funds}.
"""

from twisted.internet import defer
from twisted.protocols import amp

from cpushare.protocol import commands, paging
from cpushare.server.money.funds import formatPercent


class FundsCommands(amp.CommandLocator):
    """Responders for the money commands; C{self.session} is the market session."""

    def _funds(self):
        account = self.session.requireHello()
        return account, self.session.market.funds

    @commands.FundsAdd.responder
    def fundsAdd(self, amount):
        account, funds = self._funds()
        return defer.ensureDeferred(funds.addFunds(account, amount))

    @commands.Balance.responder
    def balance(self):
        account, funds = self._funds()

        def answer(sheet):
            return dict(sheet, currency=funds.currency, payments=funds.takesPayments,
                        commission_percent=formatPercent(funds.commission))

        return funds.balance(account).addCallback(answer)

    @commands.Statement.responder
    def statement(self, before=None):
        account, funds = self._funds()
        if before is not None and not 0 < before <= 2**62:
            raise commands.BadRequest("before must be a positive entry number")

        def answer(page):
            entries, more = page
            fitted, cut = paging.pageOf(commands.Statement, "entries", entries, len(entries))
            return {"entries": fitted, "more": more or cut, "currency": funds.currency}

        return funds.statement(account, before).addCallback(answer)

    @commands.Earnings.responder
    def earnings(self):
        account, funds = self._funds()

        def answer(sheet):
            result = {
                "earnings": sheet["earnings"], "payout": sheet["payout"],
                "currency": funds.currency, "minimum": funds.payoutMinimum,
                "payments": funds.takesPayments,
                # The most recent few, each with PayPal's words clipped.
                "payouts": [dict(p, **{k: paging.clip(p[k]) for k in ("reason", "paypal_status")
                                       if k in p}) for p in sheet["payouts"]],
            }
            if sheet["email"] is not None:
                result["email"] = sheet["email"]
            return result

        return funds.earnings(account).addCallback(answer)

    @commands.Payout.responder
    def payout(self, amount=None, email=None):
        account, funds = self._funds()

        async def request():
            p = await funds.requestPayout(account, amount, email)
            return {"payout": p["id"], "amount": p["amount"], "email": p["email"],
                    "state": p["state"], "currency": p["currency"]}

        return defer.ensureDeferred(request())
