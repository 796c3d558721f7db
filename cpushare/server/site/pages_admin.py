"""
The operator's page, C{/admin} (web administrators only): the accounts, a
page at a time, with suspend and unsuspend (each asks to confirm first);
the books, balanced or what does not hold; the payouts not settled; the
market's health.  All through the admin API functions
(L{cpushare.server.site.api}), the same store functions as
`cpushare-admin accounts|suspend|unsuspend|books`.
"""

import urllib.parse

from cpushare.money import formatAmount
from cpushare.server.site import api, apiroutes, auth
from cpushare.server.site.app import Site, field
from cpushare.server.site.pages import pageFrom, refusalOf, when

# What each account action asks the operator to confirm, and says when done.
ACTIONS = {
    "suspend": ("admin_suspend", "Suspend", "is suspended: its connections close and its"
                " certificates are refused"),
    "unsuspend": ("admin_unsuspend", "Unsuspend", "may connect again"),
}


async def adminPage(site, request, status=200, problem=None):
    market, account = site.market, await apiroutes.caller(site, request)
    accounts, refused = await pageFrom(market, account, "admin_accounts", "after",
                                       field(request, "after"))
    if refused is not None:
        status, problem = refused
    done = None
    for action, (_, _, said) in ACTIONS.items():
        name = field(request, action + "ed")
        if name:
            done = f"{name[:64]} {said}."
    return await site.render(
        request, "admin.html", status=status, problem=problem, done=done,
        accounts=accounts,
        books=await api.call(market, account, "admin_books"),
        payouts=await api.call(market, account, "admin_payouts"),
        health=await api.call(market, account, "admin_health"),
        currency=market.money.currency, amount=formatAmount, when=when)


@Site.app.route("/admin", methods=["GET"], endpoint="admin")
@auth.adminOnly
async def admin(site, request):
    return await adminPage(site, request)


@Site.app.route("/admin/<action>", methods=["POST"], endpoint="admin account action")
@auth.adminOnly
async def accountAction(site, request, action):
    """Suspend or unsuspend an account: a page asks to confirm, then it is done."""
    if action not in ACTIONS:
        return site.errorPage(request, 404, "Not found", "There is no such page on this market.")
    function, verb, _ = ACTIONS[action]
    name = (field(request, "name") or "")[:64]
    reason = (field(request, "reason") or "").strip()
    if field(request, "confirm") != "yes":
        return await site.render(request, "admin_confirm.html", action=action, verb=verb,
                                 name=name, reason=reason[:300])
    arguments = {"name": name or None}
    if action == "suspend" and reason:
        arguments["reason"] = reason
    _, refused = await refusalOf(api.call(site.market, await apiroutes.caller(site, request),
                                          function, arguments))
    if refused is not None:
        return await adminPage(site, request, *refused)
    return site.redirect(request, f"/admin?{action}ed={urllib.parse.quote(name, safe='')}")
