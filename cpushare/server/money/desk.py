"""
The market's money desk: one service that sets up, under the operator's
terms, adding funds (L{cpushare.server.money.funds}), payouts and their
polling (L{cpushare.server.money.payouts}) and what accounts see of their
money (L{cpushare.server.money.statements}), and runs PayPal's thread pool
(L{cpushare.server.money.paypal}) while the server runs.
"""

from twisted.application.service import Service
from twisted.logger import Logger

from cpushare.money import MICRO, formatAmount
from cpushare.server.money import funds, payouts
from cpushare.server.money.statements import Statements


def currencies(cursor):
    """The currencies of every payment and payout there is."""
    cursor.execute("SELECT DISTINCT currency FROM paypal_payments"
                   " UNION SELECT DISTINCT currency FROM paypal_payouts")
    return {r[0] for r in cursor.fetchall()}


def recoverInterrupted(cursor):
    """
    At start, what a stop left half done: payments being completed go back
    to waiting for their return, payouts PayPal never answered become
    unknown (see L{funds.recoverInterruptedPayments} and
    L{payouts.recoverInterruptedPayouts}).  Returns how many of each.
    """
    return (funds.recoverInterruptedPayments(cursor),
            payouts.recoverInterruptedPayouts(cursor))


class MoneyDesk(Service):
    """
    The money room as one service.  C{paypal} is an L{IPayPal} (None: this
    market takes no payments); C{commission} is in millionths of the whole
    (see L{funds.parsePercent}); C{payoutMinimum} is in micro-units;
    C{publicUrl} is where buyers' browsers reach the web endpoint (see
    L{funds.Funds}); C{pollInterval} is the seconds between questions to
    PayPal about payouts.

    Its parts: C{funds} (a L{funds.Funds}), C{payouts} (a
    L{payouts.Payouts}) and C{statements} (a L{Statements}).
    """

    log = Logger()

    def __init__(self, reactor, store, paypal=None, currency="USD", commission=0,
                 payoutMinimum=10 * MICRO, publicUrl=None, pollInterval=60.0):
        self.store = store
        self.paypal = paypal
        self.currency = currency
        self.commission = commission
        self.payoutMinimum = payoutMinimum
        self.funds = funds.Funds(store, paypal, currency, commission, publicUrl)
        self.payouts = payouts.Payouts(
            reactor, store, paypal, currency, payoutMinimum, pollInterval,
            requirePayPal=self.funds.requirePayPal,
            expirePayments=self.funds.expireUnapproved)
        self.statements = Statements(store)

    @property
    def takesPayments(self):
        return self.paypal is not None

    def startService(self):
        Service.startService(self)
        if self.paypal is not None:
            self.paypal.start()

    def stopService(self):
        Service.stopService(self)
        d = self.payouts.stopPolling()

        def stopPayPal(_):
            if self.paypal is not None:
                self.paypal.stop()

        return d.addBoth(stopPayPal)

    async def open(self):
        """After the store is open: check the currency, start polling payouts."""
        if self.paypal is None:
            return
        used = await self.store.run(currencies)
        other = sorted(used - {self.currency})
        if other:
            raise ValueError(
                f"this market's payments and payouts are in {', '.join(other)}, not "
                f"{self.currency}: start it with --currency {other[0]}")
        interruptedPayments, interruptedPayouts = await self.store.run(recoverInterrupted)
        if interruptedPayments:
            self.log.warn("{n} payments were being completed when the server stopped: "
                          "their next return completes them", n=interruptedPayments)
        if interruptedPayouts:
            self.log.error("{n} payouts were being sent to PayPal when the server stopped: "
                           "check them at PayPal, then settle them with cpushare-admin "
                           "(see 'cpushare-admin payouts', state unknown)",
                           n=interruptedPayouts)
        self.payouts.startPolling()
        self.log.info(
            "taking payments with {paypal}: commission {commission}%, payouts from "
            "{minimum} {currency}",
            paypal=self.paypal, commission=funds.formatPercent(self.commission),
            minimum=formatAmount(self.payoutMinimum), currency=self.currency)
