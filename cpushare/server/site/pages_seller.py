"""
The seller's page, C{/seller}: earnings (and what awaits verdicts),
payouts and a form to request one, the leases that ran on the account's
machines, its rating with the ratings given, its validated results and
error rate, its terms with a form to change them, and two charts (earnings
a day; its price among the prices of the sellers online).

Everything is read and changed through the API functions
(L{cpushare.server.site.api}), the same services as `cpushare earnings`,
`cpushare payout`, `cpushare terms`: a form's refusal is the command's
message, shown on the page with the form as it was sent.
"""

import re

from markupsafe import Markup

from cpushare.money import BadAmount, formatAmount, parseAmount
from cpushare.server.market.validation import validationOf
from cpushare.server.site import api, auth, charts
from cpushare.server.site.app import Site, field
from cpushare.server.site.pages import pageFrom, refusalOf, when


def amountField(request, name, allowZero=False):
    """A form's amount field in micro-units (blank: None); BadAmount names the field."""
    text = (field(request, name) or "").strip()
    if not text:
        return None
    try:
        return parseAmount(text, allowZero=allowZero)
    except BadAmount as e:
        raise BadAmount(f"{name.replace('_', ' ')}: {e}") from None


async def sellerPage(site, request, account, status=200, problem=None, sent=None):
    """The page; C{sent}: the fields of a refused form, shown again as they were."""
    market = site.market
    leases, refused = await pageFrom(site.market, account, "seller_leases", "before",
                                     field(request, "before"))
    if refused is not None:
        status, problem = refused
    earnings = await api.call(market, account, "earnings")
    standing = await api.call(market, account, "seller_rating")
    terms = await api.call(market, account, "terms")
    validation = await market.store.run(validationOf, account.id)
    currency = market.money.currency
    earned = await market.money.statements.earnedByDay(account)
    prices = [market.board.figures(s).price for s in market.sellers()]
    earnedChart = charts.lineChart([("earned", earned)], "Earnings a day", "earned a day",
                                   currency=currency)
    priceChart = charts.priceChart(terms["price"], prices, currency=currency)
    form = {"price": formatAmount(terms["price"]),
            "net_fee": formatAmount(terms.get("net_fee", 0)),
            "country": terms.get("country") or "",
            "trusted_price": formatAmount(terms["trusted_price"])
            if terms.get("trusted_price") else "",
            "amount": "", "email": earnings.get("email", "")}
    form.update(sent or {})
    done = None
    payoutId = field(request, "payout") or ""
    if re.fullmatch(r"[0-9]{1,18}", payoutId):
        done = f"Payout {int(payoutId)} requested."
    elif field(request, "terms") == "changed":
        done = "Your terms are changed; your sellers online offer them now."
    return await site.render(
        request, "seller.html", status=status, problem=problem, done=done, form=form,
        earnings=earnings, leases=leases, standing=standing, terms=terms,
        validation=validation, currency=currency, amount=formatAmount, when=when,
        earnedChart=Markup(earnedChart), priceChart=Markup(priceChart))


@Site.app.route("/seller", methods=["GET"], endpoint="seller")
@auth.loggedIn
async def seller(site, request):
    return await sellerPage(site, request, await site.account(request))


def sentForm(request, *names):
    """The fields C{names} of a form as it was sent (cut short), to show it again."""
    return {name: (field(request, name) or "")[:300] for name in names}


async def submit(site, request, function, arguments, done, sent):
    """
    A form of the seller's page: the API C{function} with the C{arguments()}
    the form gives (BadAmount names a bad field), then to the page C{done(answer)};
    refused, the page with the message and the fields C{sent} as they were.
    """
    account = await site.account(request)
    try:
        given = arguments()
    except BadAmount as e:
        refused = (400, str(e))
    else:
        answer, refused = await refusalOf(api.call(site.market, account, function, given))
        if refused is None:
            return site.redirect(request, done(answer))
    return await sellerPage(site, request, account, *refused, sent=sentForm(request, *sent))


def textField(request, name):
    """A form's text field, stripped (blank: None)."""
    return (field(request, name) or "").strip() or None


@Site.app.route("/seller/payout", methods=["POST"], endpoint="seller payout")
@auth.loggedIn
async def payout(site, request):
    return await submit(
        site, request, "payout",
        lambda: {"amount": amountField(request, "amount"), "email": textField(request, "email")},
        lambda answer: f"/seller?payout={answer['payout']}", ("amount", "email"))


@Site.app.route("/seller/terms", methods=["POST"], endpoint="seller terms")
@auth.loggedIn
async def setTerms(site, request):
    return await submit(
        site, request, "set_terms",
        lambda: {"price": amountField(request, "price", allowZero=True),
                 "net_fee": amountField(request, "net_fee", allowZero=True),
                 "country": textField(request, "country"),
                 "trusted_price": amountField(request, "trusted_price")},
        lambda answer: "/seller?terms=changed", ("price", "net_fee", "country", "trusted_price"))
