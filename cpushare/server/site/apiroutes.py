"""
The JSON API's routes: C{/api/NAME} serves the function C{NAME} of
L{cpushare.server.site.api} to the logged-in browser (docs/api.md).

A function that reads is a GET with its arguments in the query string
(L{api.fromQuery}); one that changes something is a POST with a JSON
object as its body, and the session's CSRF token in the C{X-CSRF-Token}
header, checked before any route runs (L{cpushare.server.site.auth}).
Every answer is a JSON object; an error is C{{"error": "..."}} with the
status L{api.refusal} gives it, never a traceback.
"""

import json

import attr

from cpushare.protocol.commands import BadRequest
from cpushare.server.db.store import Account
from cpushare.server.site import api, auth
from cpushare.server.site.app import Site

# The largest body a POST may carry: the longest arguments are a few texts.
MAX_BODY = 64 * 1024


class BodyTooLarge(BadRequest):
    """A POST's body is over L{MAX_BODY}."""


@attr.s(frozen=True, slots=True)
class Operator(Account):
    """The account of a web administrator's session: the API's admin functions serve it."""

    admin = attr.ib(default=True)


async def caller(site, request):
    """
    Who calls the API functions for this request: the session's account
    (an L{Operator} when the session is a web administrator's), or None.
    """
    session = await auth.webSession(site, request)
    if session is None:
        return None
    account = session.account
    return Operator(account.id, account.name, account.created) if session.admin else account


def jsonAnswer(request, status, answer):
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(answer)


def jsonBody(request):
    """A POST's arguments: its body as a JSON object (an empty body: none)."""
    kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    request.content.seek(0)
    body = request.content.read(MAX_BODY + 1)
    if len(body) > MAX_BODY:
        raise BodyTooLarge(f"the arguments are at most {MAX_BODY} bytes of JSON")
    if not body.strip():
        return {}
    if kind != b"application/json":
        raise BadRequest("send the arguments as a JSON object with Content-Type:"
                         " application/json")
    try:
        arguments = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest("the body is not a JSON object in UTF-8") from None
    if not isinstance(arguments, dict):
        raise BadRequest("the arguments must be a JSON object of names and values")
    return arguments


@Site.app.route("/api/<name>", methods=["GET", "POST"], endpoint="api")
async def apiFunction(site, request, name):
    account = await caller(site, request)
    if account is None:
        return site.toLogin(request)
    function = api.FUNCTIONS.get(name)
    if function is None:
        return jsonAnswer(request, *api.refusal(
            api.NoSuchFunction(f"there is no API function {name[:40]!r}")))
    posted = request.method == b"POST"
    if posted != function.post:
        allowed = "POST" if function.post else "GET"
        request.setHeader(b"allow", allowed.encode("ascii"))
        return jsonAnswer(request, 405, {"error": f"{name} is called with {allowed}"})
    try:
        arguments = jsonBody(request) if posted else api.fromQuery(request.args)
        answer = await api.call(site.market, account, name, arguments)
    except Exception as error:
        status, refused = api.refusal(error)
        if isinstance(error, BodyTooLarge):
            status = 413
        if status == 500:
            site.log.failure("API function {name} failed", name=name)
        return jsonAnswer(request, status, refused)
    return jsonAnswer(request, 200, answer)
