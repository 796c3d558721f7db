"""
The buyer's pages about its VMs and its money:

    /vms                      its VMs, newest first, a page at a time (live
                              with /static/vms.js, which polls /api/vms)
    /vms/ID/stop              stop a VM (POST)
    /vms/ID/console           the last lines of a running VM's console
    /leases/ID/rate           rate the seller of a lease good or bad (POST, once)
    /orders/ID/cancel         cancel an order: GET asks, POST does it
    /funds                    balances and the payments waiting at PayPal
    /funds/add                start adding funds with PayPal (POST)
    /statement                the statement, a page at a time, with a chart
    /statement.csv            the statement as a CSV download

Each page calls the API's functions (L{cpushare.server.site.api}), the
same services as the control commands; a refusal is shown on the page
with the status the API gives it.  Only the logged-in account's own VMs,
orders, leases and money are ever shown or touched: the API refuses
another's as one that does not exist.
"""

import re
import urllib.parse

import attr
from markupsafe import Markup

from cpushare.money import BadAmount, formatAmount, parseAmount
from cpushare.protocol.commands import CPUShareError
from cpushare.protocol.states import OVER
from cpushare.server.db import store
from cpushare.server.money.statements import CSV_ENTRIES
from cpushare.server.site import api, auth, charts
from cpushare.server.site.app import Site, field

# What a page was sent back with after a POST: a fixed message and a number.
DONE = {
    "stopped": "VM {} is stopping.",
    "rated": "Lease {} is rated: thank you.",
    "cancelled": "Order {} is cancelled: its VMs stop.",
    "placed": "Order {} is placed: its VMs are below.",
}
_DONE = re.compile(r"(stopped|rated|cancelled|placed)-([0-9]{1,19})\Z")
# A payment's approval page: PayPal's (or a test's fake), never a script.
_WEB_ADDRESS = re.compile(r"https?://[^\s<>\"']{1,2000}\Z")
# The most characters of an amount typed into the funds form.
MAX_AMOUNT_TEXT = 40
# How often the scripts ask for news, in seconds (they only enhance the pages).
POLL_SECONDS = 5


def _problem(error):
    """(HTTP status, message) for an API refusal (a L{CPUShareError})."""
    status, answer = api.refusal(error)
    return status, answer["error"]


def money(micro, currency=""):
    """Micro-units as the pages show them ("12.50 USD")."""
    return f"{formatAmount(micro)} {currency}".strip()


def duration(seconds):
    """CPU seconds as "1 h 02 min 03 s"."""
    seconds = int(seconds or 0)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min {seconds:02d} s"
    if minutes:
        return f"{minutes} min {seconds:02d} s"
    return f"{seconds} s"


def _done(request):
    """The message a POST sent the browser back with, or None."""
    found = _DONE.match(field(request, "done") or "")
    return found and DONE[found.group(1)].format(found.group(2))


def _before(request):
    """The page's cursor (?before=N) as the API's argument, or {}."""
    before = field(request, "before")
    return {} if before is None else {"before": before}


# -- the VMs


async def _vmsPage(site, request, account, status=200, problem=None):
    market = site.market
    try:
        listed = await api.call(market, account, "vms", _before(request))
    except CPUShareError as e:
        status, problem = _problem(e)
        listed = {"vms": [], "more": False}
    # The newest lease of each VM on this page, for its rating buttons.
    leases = await market.orders.lastLeases(account, [vm["vm"] for vm in listed["vms"]])
    rows = []
    for vm in listed["vms"]:
        lease = leases.get(vm["vm"])
        rows.append(dict(
            vm, active=vm["state"] not in OVER, cpu=duration(vm.get("cpu_seconds")),
            costText=money(vm["cost"]), lease=lease))
    orders = sorted({vm["order"] for vm in rows if vm["active"]}, reverse=True)
    more = listed["more"] and rows
    # Each pair of sellers running the buyer's VMs: direct or relayed.
    paths = [dict(attr.asdict(p), rttText="" if p.rtt is None else f"{p.rtt * 1000:.1f} ms")
             for p in market.paths.paths(account.id)]
    return await site.render(
        request, "vms.html", status=status, title="VMs", vms=rows, orders=orders, paths=paths,
        problem=problem, done=_done(request), currency=market.money.currency,
        older=f"/vms?before={rows[-1]['vm']}" if more else None,
        live=b"before" not in request.args, poll=POLL_SECONDS)


@Site.app.route("/vms", methods=["GET"])
@auth.loggedIn
async def vms(site, request):
    return await _vmsPage(site, request, await site.account(request))


async def _change(site, request, name, arguments, done):
    """Call the API's C{name}; back to /vms with C{done}, or the page with the refusal."""
    account = await site.account(request)
    try:
        await api.call(site.market, account, name, arguments)
    except CPUShareError as e:
        status, problem = _problem(e)
        request.args.pop(b"before", None)      # the newest VMs, not a form's field
        return await _vmsPage(site, request, account, status, problem)
    return site.redirect(request, "/vms?" + urllib.parse.urlencode({"done": done}))


@Site.app.route("/vms/<int:vm>/stop", methods=["POST"])
@auth.loggedIn
async def stopVM(site, request, vm):
    return await _change(site, request, "stop_vm", {"vm": vm}, f"stopped-{vm}")


@Site.app.route("/leases/<int:lease>/rate", methods=["POST"])
@auth.loggedIn
async def rate(site, request, lease):
    arguments = {"lease": lease, "good": field(request, "good")}
    return await _change(site, request, "rate", arguments, f"rated-{lease}")


@Site.app.route("/vms/<int:vm>/console", methods=["GET"])
@auth.loggedIn
async def console(site, request, vm):
    account = await site.account(request)
    status, problem, lines = 200, None, []
    try:
        lines = (await api.call(site.market, account, "console", {"vm": vm}))["lines"]
    except CPUShareError as e:
        status, problem = _problem(e)
    return await site.render(request, "console.html", status=status, title=f"Console of VM {vm}",
                             vm=vm, lines=lines, problem=problem, poll=POLL_SECONDS)


async def _ownOrder(site, account, order):
    """Whether C{order} is C{account}'s (as CancelOrder asks it)."""
    return await site.market.store.run(store.orderAccount, order) == account.id


@Site.app.route("/orders/<int:order>/cancel", methods=["GET"])
@auth.loggedIn
async def cancelForm(site, request, order):
    account = await site.account(request)
    if order > api.MAX_INTEGER or not await _ownOrder(site, account, order):
        return site.errorPage(request, 404, "Not found", f"you have no order {order}")
    return await site.render(request, "cancel.html", title=f"Cancel order {order}", order=order)


@Site.app.route("/orders/<int:order>/cancel", methods=["POST"])
@auth.loggedIn
async def cancel(site, request, order):
    return await _change(site, request, "cancel_order", {"order": order}, f"cancelled-{order}")


# -- the money


async def _fundsPage(site, request, account, status=200, problem=None, amount=""):
    balance = await api.call(site.market, account, "balance")
    currency = balance["currency"]
    shown = {key: money(balance[key], currency)
             for key in ("funds", "held", "earnings", "awaiting_verdicts")}
    pending = [dict(p, grossText=money(p["gross"], currency), netText=money(p["net"], currency))
               for p in balance["pending"]]
    return await site.render(
        request, "funds.html", status=status, title="Funds", balance=balance, shown=shown,
        pending=pending, problem=problem, amount=amount[:MAX_AMOUNT_TEXT])


@Site.app.route("/funds", methods=["GET"])
@auth.loggedIn
async def funds(site, request):
    return await _fundsPage(site, request, await site.account(request))


@Site.app.route("/funds/add", methods=["POST"])
@auth.loggedIn
async def addFunds(site, request):
    """
    Start a PayPal payment and send the browser to approve it.  The page
    that does so refreshes to PayPal rather than answering 303: a browser
    refuses to follow a form's redirect to another host (the site's
    Content-Security-Policy says form-action 'self').
    """
    account = await site.account(request)
    typed = (field(request, "amount") or "").strip()
    try:
        if len(typed) > MAX_AMOUNT_TEXT:
            raise BadAmount(f"an amount has at most {MAX_AMOUNT_TEXT} characters, like 20 or "
                            "12.50")
        amount = parseAmount(typed)
    except BadAmount as e:
        return await _fundsPage(site, request, account, 400, str(e), typed)
    try:
        payment = await api.call(site.market, account, "add_funds", {"amount": amount})
    except CPUShareError as e:
        status, problem = _problem(e)
        return await _fundsPage(site, request, account, status, problem, typed)
    approval = payment["approval_url"]
    if not _WEB_ADDRESS.match(approval):
        return await _fundsPage(site, request, account, 502,
                                "PayPal answered with an odd approval address; nothing was "
                                "charged", typed)
    currency = payment["currency"]
    return await site.render(
        request, "paypal.html", title="Approve the payment at PayPal", approval=approval,
        gross=money(payment["gross"], currency), net=money(payment["net"], currency),
        commission=money(payment["commission"], currency),
        percent=payment["commission_percent"])


@Site.app.route("/statement", methods=["GET"])
@auth.loggedIn
async def statement(site, request):
    account = await site.account(request)
    status, problem = 200, None
    try:
        page = await api.call(site.market, account, "statement", _before(request))
    except CPUShareError as e:
        status, problem = _problem(e)
        page = {"entries": [], "more": False, "currency": site.market.money.currency}
    currency = page["currency"]
    entries = [dict(e, amountText=formatAmount(e["amount"]), balanceText=formatAmount(e["balance"]))
               for e in page["entries"]]
    spent = await site.market.money.statements.spentByDay(account)
    chart = Markup(charts.lineChart([("spent", spent)], "What your VMs cost a day",
                                    "spent a day", currency=currency))
    older = f"/statement?before={entries[-1]['entry']}" if page["more"] and entries else None
    return await site.render(
        request, "statement.html", status=status, title="Statement", entries=entries,
        currency=currency, chart=chart, older=older, problem=problem,
        newest=b"before" in request.args, csvEntries=f"{CSV_ENTRIES:,}")


@Site.app.route("/statement.csv", methods=["GET"])
@auth.loggedIn
async def statementCsv(site, request):
    """The account's own statement as CSV: there is no way to name another's."""
    account = await site.account(request)
    money_ = site.market.money
    statement = await money_.statements.csvStatement(account, money_.currency)
    text = statement.text
    if statement.more:
        text += (f',note,,"only the newest {statement.entries:,} entries are in this file; '
                 'the statement pages go back further",,\r\n')
    request.setHeader(b"content-type", b"text/csv; charset=utf-8")
    request.setHeader(b"content-disposition",
                      b'attachment; filename="cpushare-statement.csv"')
    return text.encode("utf-8")
