"""
The web site's JSON API (docs/api.md): what the buyer's, the seller's and
the operator's pages show and do, as functions of (market, account,
arguments) that return JSON-able dicts.  The routes serve each at
/api/NAME; the pages call the same functions.

One set of rules: each function calls the same service methods as the
control command of the same purpose (L{cpushare.server.session},
L{cpushare.server.money.fundscontrol}) and answers what that command
answers for the same data, with a few figures the command does not carry
(a VM's cost, say).  Arguments come from a JSON object or a query string
(L{fromQuery}); each is checked here for its kind and size, by name, and
then by the service as the command's are.  An unknown argument is
refused.  An account sees and touches only its own: another account's
VM, order, lease or image is refused as one that does not exist.  The
admin functions are for the market's operators only (L{isAdmin}).

Errors are those of the control commands (L{cpushare.protocol.commands}):
their message is meant for the user; L{STATUS} gives each its HTTP status.
"""

import collections
import math
import re

import attr
from twisted.internet import defer

from cpushare.protocol import commands, paging
from cpushare.protocol.commands import BadRequest, NotAuthenticated, NotPermitted
from cpushare.server.db import store
from cpushare.server.images import SHA256
from cpushare.server.market.screens import Screens
from cpushare.server.money import billing, fundscontrol, payouts

# The largest id a list's cursor may name, as for the control commands.
MAX_ID = 2**62
MAX_INTEGER = 2**63 - 1
# The longest text an argument may be (a service may allow less, and says so).
MAX_TEXT = 4096
# The most items a list argument may have.
MAX_ITEMS = 300
# The most arguments a call may have.
MAX_ARGUMENTS = 64
# Accounts on a page of admin_accounts.
ACCOUNTS_PAGE = 500


class NoSuchFunction(BadRequest):
    """No API function has the name asked for (a 404 for the routes)."""


# The HTTP status of each error the functions raise, the most specific first.
STATUS = {
    NoSuchFunction: 404,
    NotAuthenticated: 401,
    NotPermitted: 403,
    commands.NoSuchVM: 404,
    commands.QuotaExceeded: 413,
    commands.NoPayments: 409,
    commands.PayPalFailed: 502,
    BadRequest: 400,
}


def statusOf(error):
    """The HTTP status for one of the errors the functions raise (500: a bug)."""
    for kind, status in STATUS.items():
        if isinstance(error, kind):
            return status
    return 500


def refusal(error):
    """(HTTP status, JSON answer) for an error a function raised, as the routes answer it."""
    status = statusOf(error)
    if status == 500:
        return status, {"error": "the market could not answer; the error was logged"}
    return status, {"error": str(error)}


# -- arguments


def _shown(value):
    """A value as an error message shows it: short, whatever was sent."""
    return paging.clip(repr(value), 40)


_INTEGER = re.compile(r"-?[0-9]{1,19}\Z")
_NUMBER = re.compile(r"-?[0-9]{1,15}(\.[0-9]{1,15})?\Z")
_BOOLEANS = {"true": True, "1": True, "on": True, "yes": True,
             "false": False, "0": False, "off": False, "no": False}


def integer(low=-MAX_INTEGER, high=MAX_INTEGER):
    """A whole number from C{low} to C{high} (a JSON number, or its digits in a query)."""
    def check(name, value):
        if isinstance(value, str) and _INTEGER.match(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"{name} must be a whole number, not {_shown(value)}")
        if not low <= value <= high:
            raise BadRequest(f"{name} must be a whole number from {low} to {high},"
                             f" not {value}")
        return value
    return check


def number(name, value):
    """A finite number (a JSON number, or its decimal digits in a query)."""
    if isinstance(value, str) and _NUMBER.match(value):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or abs(value) > 1e15:
        raise BadRequest(f"{name} must be a number, not {_shown(value)}")
    return value


def boolean(name, value):
    """true or false (also 1/0, on/off, yes/no in a query: a form's checkbox)."""
    if isinstance(value, str):
        value = _BOOLEANS.get(value.lower(), value)
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, not {_shown(value)}")
    return value


def text(limit=MAX_TEXT):
    """A string of at most C{limit} characters."""
    def check(name, value):
        if not isinstance(value, str):
            raise BadRequest(f"{name} must be text, not {_shown(value)}")
        if len(value) > limit or "\0" in value:
            raise BadRequest(f"{name} must be at most {limit} characters of text")
        return value
    return check


def texts(limit=MAX_TEXT, items=MAX_ITEMS):
    """A list of strings (in a query: repeated, or separated by commas)."""
    each = text(limit)

    def check(name, value):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise BadRequest(f"{name} must be a list of text, not {_shown(value)}")
        if len(value) > items:
            raise BadRequest(f"{name} has at most {items} items, not {len(value)}")
        return [each(name, item) for item in value]
    return check


def sha256(name, value):
    value = text(64)(name, value)
    if not SHA256.match(value):
        raise BadRequest(f"{name} must be a sha256 digest (64 lowercase hex digits),"
                         f" not {_shown(value)}")
    return value


REQUIRED = object()


def required(check):
    """C{check}, for an argument that must be given."""
    return (check, REQUIRED)


def parse(arguments, spec):
    """
    C{arguments} (a mapping of names to values) checked against C{spec}
    (names to checks, or to C{required(check)}): a dict of the values
    given, each converted by its check.  BadRequest names the argument
    that is unknown, missing or bad.
    """
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise BadRequest(f"the arguments must be an object of names and values,"
                         f" not {_shown(arguments)}")
    if len(arguments) > MAX_ARGUMENTS:
        raise BadRequest(f"at most {MAX_ARGUMENTS} arguments, not {len(arguments)}")
    unknown = sorted(str(name)[:40] for name in arguments if name not in spec)
    if unknown:
        raise BadRequest(f"unknown argument {unknown[0]!r}; the arguments are"
                         f" {', '.join(sorted(spec)) or 'none'}")
    values = {}
    for name, check in spec.items():
        check, need = check if isinstance(check, tuple) else (check, None)
        value = arguments.get(name)
        if value is None:
            if need is REQUIRED:
                raise BadRequest(f"{name} is missing")
            continue
        values[name] = check(name, value)
    return values


def fromQuery(args):
    """
    A query string's or a form's arguments (twisted.web's C{request.args}:
    bytes names to lists of bytes values) as a mapping for L{parse}: one
    value stays a string, repeated values make a list, and empty values
    (a form's field left blank) are not given.  A form's C{csrf} field is
    the site's (L{cpushare.server.site.auth}), checked before: not an argument.
    """
    if len(args) > MAX_ARGUMENTS:
        raise BadRequest(f"at most {MAX_ARGUMENTS} arguments, not {len(args)}")
    arguments = {}
    try:
        for name, values in args.items():
            if name == b"csrf":
                continue
            decoded = [v.decode("utf-8") for v in values[:MAX_ITEMS + 1] if v.strip()]
            if decoded:
                arguments[name.decode("utf-8")] = decoded[0] if len(decoded) == 1 else decoded
    except UnicodeDecodeError:
        raise BadRequest("the query string is not UTF-8")
    return arguments


# -- the functions


@attr.s(frozen=True)
class Function:
    """An API function: its name, checks of its arguments, and whether it is a POST."""

    name = attr.ib()
    run = attr.ib()
    spec = attr.ib()
    post = attr.ib(default=False)
    admin = attr.ib(default=False)


FUNCTIONS = {}


def isAdmin(account):
    """Whether C{account} is one of the market's operators (its record says C{admin})."""
    return getattr(account, "admin", False) is True


def api(post=False, admin=False, **spec):
    """
    Make C{f(market, account, **checked)} the API function of its name,
    called as C{f(market, account, arguments)}: it changes something when
    C{post}, and only an operator may call it when C{admin}.
    """
    def register(f):
        async def call(market, account, arguments=None):
            if account is None:
                raise NotAuthenticated("log in first")
            if admin and not isAdmin(account):
                raise NotPermitted("only the market's operators may do that")
            return await f(market, account, **parse(arguments, spec))

        call.__name__ = call.__qualname__ = f.__name__
        call.__doc__ = f.__doc__
        FUNCTIONS[f.__name__] = Function(f.__name__, call, spec, post, admin)
        return call
    return register


def call(market, account, name, arguments=None):
    """Call the API function C{name}; a Deferred that fires with its answer."""
    function = FUNCTIONS.get(name)
    if function is None:
        return defer.fail(NoSuchFunction(f"there is no API function {paging.clip(name, 40)!r}"))
    return defer.ensureDeferred(function.run(market, account, arguments))


SCREENS = {
    "max_price": integer(), "min_rating": number, "max_latency": number,
    "min_bandwidth": number, "min_cpu": number, "countries": texts(8),
    "not_countries": texts(8), "max_net_fee": integer(), "traffic": number,
    "min_validated": integer(), "trusted": boolean,
}
REPLICAS = {"replicas": integer(), "diverse": texts(16, 8)}
BEFORE = {"before": integer(1, MAX_ID)}


def _present(entry):
    """C{entry} without the keys whose value is None, as the commands answer."""
    return {k: v for k, v in entry.items() if v is not None}


# - the market


@api(offset=integer(0, MAX_INTEGER), explain=boolean, **SCREENS, **REPLICAS)
async def sellers(market, account, offset=0, explain=False, replicas=None, diverse=None,
                  **screens):
    """
    The sellers online, as ListSellers: those that pass the screens, the
    cheapest first, a page of SELLERS_PAGE from C{offset}; with C{explain}
    those the screens exclude follow, each with the reason.
    """
    screens = Screens.fromArguments(**screens)
    outlook = None
    if replicas is not None or diverse is not None:
        outlook = market.replicaOutlook(account, screens, replicas, diverse)
    entries, total, passing = market.listSellers(
        account, screens, explain, offset, commands.SELLERS_PAGE)
    for entry in entries:
        entry["excluded"] = paging.clip(entry["excluded"])
    answer = {"sellers": [_present(e) for e in entries], "total": total, "passing": passing}
    if outlook is not None:
        answer["replicas"] = outlook
    return answer


# - images


@api(after=sha256)
async def images(market, account, after=None):
    """This account's images, as ListImages: a page, after its image C{after}."""
    page, more = await _images(market).list(account, after)
    return {"images": page, "more": more}


@api(post=True, sha256=required(sha256))
async def delete_image(market, account, sha256):
    """Take one of this account's images off its images (not while a VM boots it)."""
    await _images(market).delete(account, sha256)
    return {}


def _images(market):
    if market.images is None:
        raise BadRequest("this market keeps no images")
    return market.images


# - orders and VMs


@api(post=True, image=required(sha256), vms=required(integer()), cores=required(integer()),
     memory=required(integer()), budget=integer(), dry_run=boolean, explain=boolean,
     adaptive=boolean, compare=boolean, **SCREENS, **REPLICAS)
async def place_order(market, account, image, vms, cores, memory, budget=None, replicas=None,
                      diverse=None, dry_run=False, explain=False, adaptive=False,
                      compare=False, **screens):
    """Place an order (or with C{dry_run}, say where it would go), as PlaceOrder."""
    screens = Screens.fromArguments(**screens)
    return await market.orders.place(account, image, vms, cores, memory, screens, budget,
                                     replicas, diverse, dry_run, explain, adaptive=adaptive,
                                     compare=compare)


@api(post=True, order=required(integer()))
async def cancel_order(market, account, order):
    """Cancel one of this account's orders, as CancelOrder: its VMs stop."""
    return {"stopped": await market.orders.cancel(account, order)}


@api(**BEFORE)
async def vms(market, account, before=None):
    """
    This account's VMs, as ListVMs (newest first, a page, older than VM
    C{before}), each with C{cost}: what its leases were charged.
    """
    page, more = await market.orders.list(account, before)
    costs = await market.orders.costs(account, [vm["vm"] for vm in page])
    for vm in page:
        vm["cost"] = costs.get(vm["vm"], 0)
    return {"vms": page, "more": more}


@api(vm=required(integer()), lines=integer())
async def console(market, account, vm, lines=None):
    """The last lines of one of this account's running VMs' console."""
    kw = {} if lines is None else {"lines": lines}
    return {"vm": vm, "lines": market.orders.consoleTail(account, vm, **kw)}


@api(post=True, vm=required(integer()))
async def stop_vm(market, account, vm):
    """Stop one of this account's VMs, as StopVM."""
    market.orders.stopVM(account, vm)
    return {}


@api(**BEFORE)
async def leases(market, account, before=None):
    """The leases of this account's VMs, as ListLeases: newest first, a page."""
    page, more = await market.orders.leases(account, before)
    return {"leases": page, "more": more}


@api(post=True, lease=required(integer()), good=required(boolean), comment=text())
async def rate(market, account, lease, good, comment=None):
    """Rate the seller of one of this account's leases good or bad, as Rate."""
    rated = await market.ratings.rate(account, lease, good, comment)
    return {"seller": rated.seller, "rating": rated.rating, "votes": rated.votes}


# - money


@api()
async def balance(market, account):
    """This account's balances, as Balance."""
    money = market.money
    return fundscontrol.balanceAnswer(money, await money.statements.balance(account))


@api(before=integer())
async def statement(market, account, before=None):
    """A page of this account's statement, as Statement: newest first."""
    money = market.money
    fundscontrol.checkEntry(before)
    page = await money.statements.statement(account, before)
    return fundscontrol.statementAnswer(money, page)


@api(post=True, amount=required(integer()))
async def add_funds(market, account, amount):
    """Start adding funds with PayPal, as FundsAdd: the page to approve the payment at."""
    return await market.money.funds.addFunds(account, amount)


# - sellers


@api()
async def earnings(market, account):
    """This account's earnings as a seller and its recent payouts, as Earnings."""
    money = market.money
    return fundscontrol.earningsAnswer(money, await money.statements.earnings(account))


@api(post=True, amount=integer(), email=text(254))
async def payout(market, account, amount=None, email=None):
    """Pay out earnings with PayPal, as Payout."""
    return await fundscontrol.requestPayout(market.money, account, amount, email)


@api(**BEFORE)
async def seller_leases(market, account, before=None):
    """The leases that ran on this account's sellers: newest first, a page."""
    page, more = await market.orders.sellerLeases(account, before)
    return {"leases": page, "more": more}


@api(**BEFORE)
async def seller_rating(market, account, before=None):
    """This account's rating as a seller, and the ratings its leases were given."""
    rated, history, more = await market.ratings.received(account, before)
    return {"rating": rated.rating, "votes": rated.votes,
            "ratings": [_present(r) for r in history], "more": more}


@api()
async def terms(market, account):
    """This account's terms as a seller (price a core-hour, fee a GB, country)."""
    return _present(await market.board.termsOf(account.id))


@api(post=True, price=integer(), net_fee=integer(), country=text(8), trusted_price=integer())
async def set_terms(market, account, price=None, net_fee=None, country=None,
                    trusted_price=None):
    """Change this account's terms as a seller, as SetTerms (and its trusted price)."""
    return _present(await market.setTerms(account, price, net_fee, country, trusted_price))


# - the operator's


@api(admin=True, after=integer(0, MAX_ID))
async def admin_accounts(market, account, after=0):
    """The market's accounts, as `cpushare-admin accounts`: a page, after id C{after}."""
    rows = await market.store.run(store.listAccounts, after, ACCOUNTS_PAGE + 1)
    return {"accounts": [_present(r) for r in rows[:ACCOUNTS_PAGE]],
            "more": len(rows) > ACCOUNTS_PAGE}


@api(admin=True, post=True, name=required(text(64)),
     reason=text(store.MAX_SUSPEND_REASON))
async def admin_suspend(market, account, name, reason=None):
    """
    Suspend an account, as `cpushare-admin suspend`: its connections close
    within the server's --access-check and its certificates are refused.
    """
    if name == account.name:
        raise BadRequest("an operator cannot suspend its own account")
    if not await market.store.run(store.suspendAccount, name, reason):
        raise BadRequest(f"no active, unsuspended account named {name!r}")
    return {"suspended": name}


@api(admin=True, post=True, name=required(text(64)))
async def admin_unsuspend(market, account, name):
    """Let a suspended account connect again, as `cpushare-admin unsuspend`."""
    if not await market.store.run(store.unsuspendAccount, name):
        raise BadRequest(f"no suspended account named {name!r}")
    return {"unsuspended": name}


@api(admin=True)
async def admin_books(market, account):
    """Whether the books balance, as `cpushare-admin books` proves it."""
    report = await market.store.run(billing.checkBooks)
    return {
        "ok": report["ok"], "transactions": report["transactions"],
        "entries": report["entries"], "total": report["total"],
        "by_kind": report["byKind"],
        "unbalanced": [{"transaction": t, "sum": s} for t, s in report["unbalanced"]],
        "negative": [{"account": n, "balance": b} for n, b in report["negative"]],
        "drift": [{"account": n, "balance": b, "entries": s} for n, b, s in report["drift"]],
        "held": [{"account": a, "held": h, "leases": ls} for a, h, ls in report["held"]],
        "pending": [{"account": a, "pending": p, "leases": ls}
                    for a, p, ls in report["pending"]],
    }


@api(admin=True)
async def admin_payouts(market, account):
    """The payouts not settled yet (requested, pending at PayPal, unknown), oldest first."""
    rows = await market.store.run(payouts.openPayouts, ACCOUNTS_PAGE)
    return {"payouts": [_present(attr.asdict(p)) for p in rows]}


@api(admin=True)
async def admin_health(market, account):
    """The market now: connections, sellers online and their cores, VMs by state."""
    sellersOnline = market.sellers()
    used = [market.orders.used(s) for s in sellersOnline]
    byState = collections.Counter(
        str(vm.state) for vm in market.orders.vms.values() if not vm.system)
    roles = collections.Counter(s.role for s in market.sessions.values())
    return {
        "connections": len(market.sessions),
        "sellers_online": len(sellersOnline),
        "buyers_online": roles.get("buyer", 0),
        "cores_offered": sum(s.offer["cores"] for s in sellersOnline),
        "cores_used": sum(cores for cores, _ in used),
        "vms_running": byState.get("running", 0),
        "vms": dict(sorted(byState.items())),
    }
