"""
The walk: every route of the web site's Klein app (read from its URL map,
so a route added later is walked too), every API function, visited as
nobody, as alice (who owns a VM, an order, a lease and an image), as bob
given alice's ids, and as bob who is no operator.  Nobody is sent to log in
(401 on /api/), bob never sees alice's name or ids, a non-operator gets 403
on the operator's pages and API functions, every response carries the
security headers, and none holds a traceback.
"""

import json
import re
import urllib.parse

from cpushare.server.db import store
from cpushare.server.site import api
from cpushare.server.site.app import Site

from test.unit.test_site_seller import SiteOrderCase

# Routes anybody may see: the market's front page, the login pages and the
# style sheet.
PUBLIC = {"buyer GET /", "loginForm", "login", "loginLinkForm", "loginLink", "logoutForm",
          "logout",
          "staticFile"}
# Routes a logged-in walk leaves alone: they would end its session.
SESSION = {"login", "logout", "loginLink"}
# The values a route's argument takes in the walk, by its name (a route
# with an argument not named here fails the walk: add what it takes).
ARGUMENTS = {
    "name": None,                       # /api/<name>: every function; /static/<name>
    "token": ["no-such-login-link"],
    "action": ["suspend", "unsuspend", "nothing"],
}
# Alice's ids, by the words an argument's name holds.
IDS = ("vm", "order", "lease", "image", "sha")
HEADERS = {
    "content-security-policy": "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def rules():
    """[(endpoint, method, rule)] of every route of the site (HEAD aside)."""
    found = []
    for rule in Site.app.url_map.iter_rules():
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            found.append((rule.endpoint, method, rule))
    return found


class WalkTests(SiteOrderCase):

    async def aliceHasThings(self):
        """alice's VM runs on sam's seller: her order, VM, lease and image are the ids walked."""
        self.order, self.vm, self.lease = await self.aliceOnSam()
        self.ids = {"vm": self.vm, "order": self.order, "lease": self.lease,
                    "image": self.sha, "sha": self.sha}

    def idFor(self, argument):
        for word in IDS:
            if word in argument.lower():
                return self.ids[word]
        return None

    def paths(self, rule):
        """The paths the walk visits for C{rule}, with alice's ids in them."""
        if not rule.arguments:
            return [rule.rule]
        [argument] = rule.arguments      # one argument a route, as the site has them
        if rule.rule == "/api/<name>":
            values = sorted(api.FUNCTIONS)
        elif rule.rule == "/static/<name>":
            values = ["site.css", "nothing.css"]
        elif self.idFor(argument) is not None:
            values = [self.idFor(argument)]
        elif argument in ARGUMENTS and ARGUMENTS[argument]:
            values = ARGUMENTS[argument]
        else:
            self.fail(f"the walk has no value for <{argument}> of {rule.rule}: add what it"
                      " takes to ARGUMENTS")
        return [re.sub(r"<[^>]+>", urllib.parse.quote(str(v), safe=""), rule.rule)
                for v in values]

    def apiArguments(self, name):
        """An API function's arguments: alice's ids wherever it takes one."""
        spec = api.FUNCTIONS[name].spec
        return {a: self.ids[w] for a in spec for w in IDS if w in a and a != "image"} | (
            {"image": self.sha} if "image" in spec else {})

    async def visit(self, browser, method, path, token):
        """One request of the walk, checked for what every response must be."""
        if path.startswith("/api/"):
            name = path[len("/api/"):]
            arguments = self.apiArguments(name) if name in api.FUNCTIONS else {}
            if method == "GET":
                query = urllib.parse.urlencode(arguments)
                page = await browser.get(path + ("?" + query if query else ""))
            else:
                page = await browser.request("POST", path, json.dumps(arguments).encode(), {
                    "Content-Type": "application/json", "X-CSRF-Token": token or ""})
        elif method == "GET":
            page = await browser.get(path)
        else:
            fields = {w: self.ids[w] for w in IDS}
            fields.update(name="alice", csrf=token or "")
            page = await browser.post(path, fields)
        where = f"{method} {path}"
        for header, value in HEADERS.items():
            self.assertIn(value, page.headers.get(header, ""), where)
        self.assertNotIn("Traceback", page.text, where)
        self.assertNotEqual(page.status, 500, (where, page))
        return page

    async def test_the_walk_finds_every_route(self):
        found = {(endpoint, method) for endpoint, method, _ in rules()}
        for route in [("seller", "GET"), ("seller payout", "POST"), ("admin", "GET"),
                      ("admin account action", "POST"), ("api", "GET"), ("api", "POST"),
                      ("buyer GET /", "GET"), ("login", "POST")]:
            self.assertIn(route, found)

    async def test_nobody_is_sent_to_log_in(self):
        await self.aliceHasThings()
        browser = self.browser()
        token = (await browser.get("/login")).csrf()     # the form cookie's token
        for endpoint, method, rule in rules():
            if endpoint in PUBLIC:
                continue
            for path in self.paths(rule):
                page = await self.visit(browser, method, path, token)
                where = f"{method} {path}"
                if path.startswith("/api/"):
                    self.assertEqual((page.status, json.loads(page.text)),
                                     (401, {"error": "log in first"}), where)
                else:
                    self.assertEqual(page.status, 303, (where, page))
                    self.assertTrue(page.location.startswith("/login?next="), where)
                self.assertNotIn("alice", page.text, where)
        # The public pages answer without a traceback too.
        for endpoint, method, rule in rules():
            if endpoint in PUBLIC - SESSION and method == "GET":
                for path in self.paths(rule):
                    await self.visit(browser, method, path, token)

    async def test_bob_never_sees_alices_names_or_ids(self):
        await self.aliceHasThings()
        bob = await self.browserOf("bob")
        token = await self.csrfOf(bob)
        secrets = ["alice", self.sha, "fast and"]
        for endpoint, method, rule in rules():
            if endpoint in SESSION:
                continue
            for path in self.paths(rule):
                page = await self.visit(bob, method, path, token)
                where = f"{method} {path}"
                # A refusal may repeat the id bob sent; nothing else may show it.
                shown = page.text.replace(f"you have no image {self.sha}", "")
                for secret in secrets:
                    self.assertNotIn(secret, shown, where)
                if path.startswith("/api/") and self.apiArguments(path[5:]).keys() & {
                        "vm", "order", "lease", "sha256"}:
                    self.assertIn(page.status, (400, 403, 404, 405), (where, page))
        # Nothing of alice's was touched.
        alice = await self.accountNamed("alice")
        [vm] = (await api.call(self.market, alice, "vms"))["vms"]
        self.assertEqual((vm["vm"], vm["state"]), (self.vm, "running"))
        [image] = (await api.call(self.market, alice, "images"))["images"]
        self.assertEqual(image["sha256"], self.sha)
        [lease] = (await api.call(self.market, alice, "leases"))["leases"]
        self.assertEqual(lease["rating"], "good")

    async def test_a_non_operator_gets_403_on_the_operators_routes(self):
        await self.aliceHasThings()
        bob = await self.browserOf("bob")
        token = await self.csrfOf(bob)
        checked = 0
        for endpoint, method, rule in rules():
            for path in self.paths(rule):
                operators = path.startswith("/admin") or (
                    path.startswith("/api/admin_") and path[5:] in api.FUNCTIONS)
                if not operators:
                    continue
                if path.startswith("/api/"):
                    function = api.FUNCTIONS[path[5:]]
                    if function.post != (method == "POST"):
                        continue
                page = await self.visit(bob, method, path, token)
                self.assertEqual(page.status, 403, f"{method} {path}")
                checked += 1
        self.assertGreaterEqual(checked, 8)

        rows = await self.store.run(store.listAccounts)
        self.assertEqual([r["name"] for r in rows if r["suspended"]], [])

    async def test_alice_walks_every_route_with_her_ids(self):
        await self.aliceHasThings()
        alice = await self.browserOf("alice")
        token = await self.csrfOf(alice)
        for endpoint, method, rule in rules():
            if endpoint in SESSION or method != "GET":
                continue
            for path in self.paths(rule):
                page = await self.visit(alice, method, path, token)
                self.assertNotIn(page.status, (401, 500), f"{method} {path}")
