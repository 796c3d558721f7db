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

import datetime

from markupsafe import Markup

from cpushare.money import BadAmount, formatAmount, parseAmount
from cpushare.server.market.validation import validationOf
from cpushare.server.site import api, auth, charts
from cpushare.server.site.app import Site, field


def when(value):
    """A time as the pages show it: epoch seconds or ISO text as 'YYYY-MM-DD HH:MM UTC'."""
    if value is None or value == "":
        return ""
    try:
        if isinstance(value, (int, float)):
            moment = datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
        else:
            moment = datetime.datetime.fromisoformat(str(value))
    except (ValueError, OverflowError, OSError):
        return str(value)[:40]
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def amountField(request, name, allowZero=False):
    """A form's amount field in micro-units (blank: None); BadAmount names the field."""
    text = (field(request, name) or "").strip()
    if not text:
        return None
    try:
        return parseAmount(text, allowZero=allowZero)
    except BadAmount as e:
        raise BadAmount(f"{name.replace('_', ' ')}: {e}") from None


async def refusalOf(call):
    """(answer, None) of an awaited API call, or (None, (status, message)) when refused."""
    try:
        return await call, None
    except Exception as error:
        status, answer = api.refusal(error)
        if status == 500:
            Site.log.failure("a page's API call failed")
        return None, (status, answer["error"])


async def sellerPage(site, request, account, status=200, problem=None, sent=None):
    """The page; C{sent}: the fields of a refused form, shown again as they were."""
    market = site.market
    before = field(request, "before")
    leases, refused = await refusalOf(api.call(
        market, account, "seller_leases", {} if before is None else {"before": before}))
    if refused is not None:
        status, problem = refused
        leases = await api.call(market, account, "seller_leases")
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
            "amount": "", "email": earnings.get("email", "")}
    form.update(sent or {})
    done = None
    if field(request, "payout"):
        done = f"Payout {field(request, 'payout')[:20]} requested."
    elif field(request, "terms"):
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


@Site.app.route("/seller/payout", methods=["POST"], endpoint="seller payout")
@auth.loggedIn
async def payout(site, request):
    account = await site.account(request)
    try:
        arguments = {"amount": amountField(request, "amount"),
                     "email": (field(request, "email") or "").strip() or None}
    except BadAmount as e:
        refused = (400, str(e))
    else:
        done, refused = await refusalOf(api.call(site.market, account, "payout", arguments))
        if refused is None:
            return site.redirect(request, f"/seller?payout={done['payout']}")
    return await sellerPage(site, request, account, *refused,
                            sent=sentForm(request, "amount", "email"))


@Site.app.route("/seller/terms", methods=["POST"], endpoint="seller terms")
@auth.loggedIn
async def setTerms(site, request):
    account = await site.account(request)
    try:
        arguments = {"price": amountField(request, "price", allowZero=True),
                     "net_fee": amountField(request, "net_fee", allowZero=True),
                     "country": (field(request, "country") or "").strip() or None}
    except BadAmount as e:
        refused = (400, str(e))
    else:
        _, refused = await refusalOf(api.call(site.market, account, "set_terms", arguments))
        if refused is None:
            return site.redirect(request, "/seller?terms=changed")
    return await sellerPage(site, request, account, *refused,
                            sent=sentForm(request, "price", "net_fee", "country"))
