"""
The buyer's pages: the market, images and the order form.

    /                     the sellers online and the screens (GET form, paged, explain)
    /images               this account's images, and the upload form (POST, multipart)
    /images/SHA/delete    GET: confirm; POST: delete
    /orders/new           the order form; with review=1 the dry run of the order
    /orders               POST: place the order, then /vms

Each page calls the JSON API's functions (L{cpushare.server.site.api}),
which call the same services as the control commands; what the form says
in a person's words (an amount "0.50", replicas "auto") is turned into the
API's arguments here, and a refusal is shown on the page with the form
refilled.
"""

import urllib.parse

from cpushare.money import BadAmount, formatAmount, parseAmount
from cpushare.protocol.commands import BadRequest
from cpushare.server.db import store
from cpushare.server.images import SHA256
from cpushare.server.market.replicas import DIVERSITY, MAX_REPLICAS
from cpushare.server.site import api, auth, upload
from cpushare.server.site.app import Site, field

# The screens both the market and the order form take, as the form names them.
SCREEN_FIELDS = ("max_price", "max_net_fee", "min_rating", "min_validated", "max_latency",
                 "min_bandwidth", "min_cpu", "countries", "not_countries", "trusted")
# Form fields that are amounts of money ("0.50"): micro-units for the API.
AMOUNTS = {"max_price": "the maximum price", "max_net_fee": "the maximum network fee",
           "budget": "the budget"}
MARKET_FIELDS = SCREEN_FIELDS + ("explain", "replicas", "diverse", "offset")
ORDER_FIELDS = ("image", "vms", "cores", "memory", "budget") + SCREEN_FIELDS + (
    "replicas", "diverse")
# Replicas an order may have; the market's outlook is for a number of them.
REPLICA_CHOICES = ["", "auto"] + [str(k) for k in range(2, MAX_REPLICAS + 1)]
MARKET_REPLICAS = [c for c in REPLICA_CHOICES if c != "auto"]
# The errors of the API's functions that a page shows as they say (others are bugs).
REFUSED = tuple(api.STATUS)


def formValues(request, names):
    """The fields C{names} of the request as typed ({name: text}; lists joined), for refilling."""
    values = {}
    for name in names:
        given = request.args.get(name.encode()) or []
        try:
            texts = [v.decode("utf-8") for v in given[:api.MAX_ITEMS]]
        except UnicodeDecodeError:
            texts = []
        values[name] = texts if name == "diverse" else ", ".join(t for t in texts if t.strip())
    return values


def arguments(request, names, extra=()):
    """
    The request's fields C{names} as the API's arguments: amounts in
    micro-units, replicas "auto" as adaptive; any other field (but
    C{extra}, the page's own) is refused by name.  BadRequest says what is wrong.
    """
    given = api.fromQuery({k: v for k, v in request.args.items()
                           if k.decode("latin-1") not in extra})
    unknown = sorted(name for name in given if name not in names)
    if unknown:
        raise BadRequest(f"this form has no field {unknown[0][:40]!r}")
    for name, label in AMOUNTS.items():
        if name in given:
            if not isinstance(given[name], str):
                raise BadRequest(f"{label} is one amount")
            try:
                given[name] = parseAmount(given[name])
            except BadAmount as e:
                raise BadRequest(f"{label}: {e}")
    if given.get("replicas") == "auto":
        del given["replicas"]
        given["adaptive"] = True
    return given


def route(path, method):
    """A page of this module at C{path} for C{method} (endpoints named apart from others')."""
    return Site.app.route(path, methods=[method], endpoint=f"buyer {method} {path}")


def trustedShown(seller, now):
    """A seller's Trusted cell: when its TPM's last quote passed, or why it is not trusted."""
    if seller.get("trust") is None and seller.get("attested") is not None:
        minutes = max(0, int(now - seller["attested"]) // 60)
        return "attested just now" if minutes == 0 else f"attested {minutes} min ago"
    if (seller.get("trust") or "").startswith("not attested"):
        return seller["trust"]
    return "-"


def refusalText(error):
    """What a page says for an error the API raised (a bug's words stay in the log)."""
    return api.refusal(error)[1]["error"]


def _query(values, **changes):
    """A query string of the form's C{values} (as L{formValues} gives them) with C{changes}."""
    pairs = []
    for name, value in dict(values, **changes).items():
        for v in (value if isinstance(value, list) else [value]):
            if v not in ("", None):
                pairs.append((name, v))
    return urllib.parse.urlencode(pairs)


async def _call(site, account, name, args):
    """(answer, None), or (None, the refusal's text) for a BadRequest."""
    try:
        return await api.call(site.market, account, name, args), None
    except REFUSED as e:
        return None, refusalText(e)


# -- the market


@route("/", "GET")
async def market(site, request):
    account = await site.account(request)
    if account is None:
        return await site.render(request, "home.html")
    values = formValues(request, MARKET_FIELDS)
    answer, problem = None, None
    try:
        args = arguments(request, MARKET_FIELDS)
    except REFUSED as e:
        problem = refusalText(e)
    else:
        answer, problem = await _call(site, account, "sellers", args)
    sellers = (answer or {}).get("sellers", [])
    now = site.reactor.seconds()
    for s in sellers:
        s["trusted_shown"] = trustedShown(s, now)
    offset = int(values["offset"]) if answer and values["offset"] else 0
    nextPage = None
    if answer and offset + len(sellers) < answer["total"]:
        nextPage = "/?" + _query(values, offset=str(offset + len(sellers)))
    return await site.render(
        request, "market.html", status=200 if problem is None else 400, form=values,
        problem=problem, answer=answer, sellers=sellers, offset=offset, nextPage=nextPage,
        amount=formatAmount, diversity=DIVERSITY, replicaChoices=MARKET_REPLICAS)


# -- images


async def _imagesPage(site, request, account, problem=None, message=None, status=200):
    after = field(request, "after")
    args = {"after": after} if after and request.method == b"GET" else {}
    answer, refused = await _call(site, account, "images", args)
    more = None
    if answer and answer["more"] and answer["images"]:
        more = "/images?" + urllib.parse.urlencode({"after": answer["images"][-1]["sha256"]})
    return await site.render(
        request, "images.html", status=status if refused is None else 400,
        images=(answer or {}).get("images", []), more=more, problem=problem or refused,
        message=message, quota=site.market.images.quota if site.market.images else 0)


@route("/images", "GET")
@auth.loggedIn
async def images(site, request):
    account = await site.account(request)
    message = None
    if field(request, "deleted") == "1":
        message = "The image was deleted."
    elif field(request, "held") == "1":
        message = "You already have this image: it was not stored again."
    stored = field(request, "stored")
    if stored and SHA256.match(stored):
        message = f"Image {stored} is stored: place an order with it."
    return await _imagesPage(site, request, account, message=message)


@route("/images", "POST")
@auth.loggedIn
async def uploadImage(site, request):
    account = await site.account(request)
    if site.market.images is None:
        return await _imagesPage(site, request, account, "this market keeps no images", 400)
    form = getattr(request, "form", None)
    try:
        sha256 = await upload.storeImage(site.market.images, account, request.content, form,
                                         field(request, "name"))
    except REFUSED as e:
        status = api.statusOf(e)
        return await _imagesPage(site, request, account, problem=refusalText(e),
                                 status=status)
    if sha256 is None:
        return site.redirect(request, "/images?held=1")
    return site.redirect(request, "/images?stored=" + sha256)


async def _heldImage(site, account, sha256):
    """The size of C{account}'s image C{sha256}, or None (another's, or none)."""
    if not SHA256.match(sha256):
        return None
    return await site.market.store.run(store.imageSize, account.id, sha256)


@route("/images/<sha256>/delete", "GET")
@auth.loggedIn
async def confirmDelete(site, request, sha256):
    account = await site.account(request)
    size = await _heldImage(site, account, sha256)
    if size is None:
        return site.errorPage(request, 404, "Not found", "You have no such image.")
    return await site.render(request, "image_delete.html", sha256=sha256, size=size)


@route("/images/<sha256>/delete", "POST")
@auth.loggedIn
async def deleteImage(site, request, sha256):
    account = await site.account(request)
    _, problem = await _call(site, account, "delete_image", {"sha256": sha256})
    if problem is not None:
        return await _imagesPage(site, request, account, problem=problem, status=400)
    return site.redirect(request, "/images?deleted=1")


# -- orders


async def _orderPage(site, request, account, values, problem=None, plan=None, status=200):
    answer, refused = await _call(site, account, "images", {})
    return await site.render(
        request, "order.html", status=status if problem is None else 400,
        form=values, problem=problem or refused, plan=plan,
        images=(answer or {}).get("images", []), amount=formatAmount,
        diversity=DIVERSITY, replicaChoices=REPLICA_CHOICES)


@route("/orders/new", "GET")
@auth.loggedIn
async def orderForm(site, request):
    account = await site.account(request)
    values = formValues(request, ORDER_FIELDS)
    if field(request, "review") is None:
        defaults = {"vms": "1", "cores": "1", "memory": "256"}
        for name, value in defaults.items():
            values[name] = values[name] or value
        return await _orderPage(site, request, account, values)
    try:
        args = arguments(request, ORDER_FIELDS, extra=("review",))
        args["dry_run"] = True
        plan = await api.call(site.market, account, "place_order", args)
    except REFUSED as e:
        return await _orderPage(site, request, account, values, problem=refusalText(e))
    plan["total"] = int(args["vms"]) * (args.get("replicas") or 1)
    return await _orderPage(site, request, account, values, plan=plan)


@route("/orders", "POST")
@auth.loggedIn
async def placeOrder(site, request):
    account = await site.account(request)
    values = formValues(request, ORDER_FIELDS)
    try:
        args = arguments(request, ORDER_FIELDS)
        placed = await api.call(site.market, account, "place_order", args)
    except REFUSED as e:
        return await _orderPage(site, request, account, values, problem=refusalText(e))
    return site.redirect(request, f"/vms?done=placed-{int(placed['order'])}")

