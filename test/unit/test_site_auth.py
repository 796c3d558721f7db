"""
Logging in to the web site, as a stranger, a thief of cookies and links,
a cross-site form and a password guesser would try it: sessions, login
links, CSRF tokens and the limits on failed logins, on the market in
memory (test/sitebrowser.py) and its clock.
"""

import secrets

from twisted.internet import defer

from cpushare.protocol import commands
from cpushare.server.db import store as storesql
from cpushare.server.market import weblogin
from cpushare.server.site import auth

from test.fakemarket import LogCapture
from test.sitebrowser import PUBLIC_URL, SiteCase

PASSWORD = "correct horse battery"
# The addresses people bookmark that need a login.
GUARDED = ["/orders/new", "/vms", "/images", "/funds", "/statement", "/seller", "/admin"]


class SessionTests(SiteCase):

    async def assertSentToLogin(self, browser, path="/vms"):
        page = await browser.get(path)
        self.assertEqual(page.status, 303, page)
        self.assertTrue(page.location.startswith("/login?next="), page.location)
        return page

    async def test_a_browser_without_a_session_is_sent_to_login_and_back_after(self):
        browser = self.browser()
        for path in GUARDED:
            page = await self.assertSentToLogin(browser, path)
            self.assertEqual(page.location, "/login?next=" + path.replace("/", "%2F"))
        await self.account("alice", PASSWORD)
        form = await browser.get("/login?next=%2Fvms")
        page = await browser.post("/login", {"name": "alice", "password": PASSWORD,
                                             "next": "/vms", "csrf": form.csrf()})
        self.assertEqual((page.status, page.location), (303, "/vms"))
        page = await browser.get("/vms")
        self.assertEqual(page.status, 200, page)
        self.assertIn("alice", page.text)

    async def test_a_login_goes_back_only_to_a_page_of_this_site(self):
        await self.account("alice", PASSWORD)
        for elsewhere in ("//evil.example/", "https://evil.example/", "/\\evil.example",
                          "javascript:alert(1)", "/x\r\nSet-Cookie: a=b"):
            browser = self.browser()
            form = await browser.get("/login")
            page = await browser.post("/login", {"name": "alice", "password": PASSWORD,
                                                 "next": elsewhere, "csrf": form.csrf()})
            self.assertEqual((page.status, page.location), (303, "/"), elsewhere)

    async def test_a_forged_cookie_is_nobody(self):
        await self.loggedIn("alice")
        browser = self.browser()
        for forged in (secrets.token_urlsafe(32), "x" * 43, "'; DROP TABLE accounts; --",
                       "a" * 5000, "\u00e9" * 43):
            browser.cookies = {"__Host-cpushare-session": forged}
            await self.assertSentToLogin(browser)
        # Another account's session id is only its SHA-256 in the database.
        [[stored]] = await self.store.run(
            lambda c: c.execute("SELECT id FROM web_sessions").fetchall())
        browser.cookies = {"__Host-cpushare-session": stored}
        await self.assertSentToLogin(browser)

    async def test_a_session_ends_after_12_idle_hours_and_lives_while_used(self):
        browser = await self.loggedIn("alice")
        for _ in range(3):
            self.reactor.advance(weblogin.SESSION_IDLE - 3600)
            self.assertEqual((await browser.get("/vms")).status, 200)
        self.reactor.advance(weblogin.SESSION_IDLE + 1)
        await self.assertSentToLogin(browser)

    async def test_a_suspended_or_deleted_accounts_browsers_are_logged_out(self):
        alice = await self.loggedIn("alice")
        bob = await self.loggedIn("bob")
        await self.store.run(storesql.suspendAccount, "alice", "fraud")
        await self.assertSentToLogin(alice)
        await self.store.run(storesql.deleteAccount, "bob")
        await self.assertSentToLogin(bob)
        browser = self.browser()
        form = await browser.get("/login")
        page = await browser.post("/login", {"name": "alice", "password": PASSWORD,
                                             "csrf": form.csrf()})
        self.assertEqual(page.status, 403)
        self.assertIn("wrong name or password", page.text)

    async def test_the_session_cookie_is_secure_httponly_strict_and_new_at_each_login(self):
        browser = await self.loggedIn("alice")
        first = browser.cookies["__Host-cpushare-session"]
        # Logging in again from a logged-in browser (another tab's form).
        again = self.browser()
        again.cookies = dict(browser.cookies)
        page = await again.post("/login", {"name": "alice", "password": PASSWORD,
                                           "csrf": (await again.get("/vms")).csrf()})
        self.assertEqual(page.status, 303, page)
        [cookie] = [c for c in page.cookies if c.startswith("__Host-cpushare-session=")]
        attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
        self.assertTrue({"secure", "httponly", "samesite=strict", "path=/"} <= attributes,
                        cookie)
        self.assertFalse(any(a.startswith("domain") for a in attributes), cookie)
        self.assertNotEqual(again.cookies["__Host-cpushare-session"], first)

    async def test_a_new_password_logs_out_every_browser(self):
        browser = await self.loggedIn("alice")
        [alice] = [a for a in await self.store.run(storesql.listAccounts)
                   if a["name"] == "alice"]
        account = storesql.Account(alice["id"], "alice", alice["created"])
        await self.market.weblogins.setPassword(account, "another long password")
        await self.assertSentToLogin(browser)


class LinkTests(SiteCase):

    async def useLink(self, browser, path):
        """Open a login link's page, then press its button: the answer to the POST."""
        page = await browser.get(path)
        self.assertEqual(page.status, 200, page)
        return await browser.post(path, {"csrf": page.csrf()})

    async def test_a_login_link_logs_in_once(self):
        alice = await self.account("alice")
        url = await self.market.weblogins.loginLink(alice)
        self.assertTrue(url.startswith(PUBLIC_URL + "/login/"), url)
        path = url[len(PUBLIC_URL):]
        browser = self.browser()
        page = await self.useLink(browser, path)
        self.assertEqual((page.status, page.location), (303, "/"))
        self.assertIn("alice", (await browser.get("/")).text)
        # Replayed, by the same browser or by whoever saw the link.
        for replay in (self.browser(), browser):
            page = await replay.get(path)
            self.assertEqual(page.status, 403)
            self.assertIn("used, expired or unknown", page.text)
            token = (await replay.get("/login")).csrf() or (await replay.get("/logout")).csrf()
            page = await replay.post(path, {"csrf": token})
            self.assertEqual(page.status, 403)
            self.assertIn("used, expired or unknown", page.text)
        # Only the token's SHA-256 is stored.
        token = path.rsplit("/", 1)[1]
        rows = await self.store.run(
            lambda c: c.execute("SELECT * FROM web_login_tokens").fetchall())
        self.assertNotIn(token, repr(rows))

    async def test_opening_a_login_link_names_its_account_and_logs_nobody_in(self):
        """
        Login CSRF: a link mallory sends alice does not log alice's browser
        in to mallory's account when she opens it, nor when a page of
        mallory's posts to it; the link's page names mallory, and opening it
        (a link preview, a scanner) does not spend it.
        """
        mallory = await self.account("mallory")
        path = (await self.market.weblogins.loginLink(mallory))[len(PUBLIC_URL):]
        alice = self.browser()
        for _ in range(2):
            page = await alice.get(path)
            self.assertEqual(page.status, 200)
            self.assertIn("logs this browser in as <strong>mallory</strong>", page.text)
            self.assertNotIn("__Host-cpushare-session", alice.cookies)
            self.assertEqual((await alice.get("/vms")).status, 303)
        # A form on another site posts without the browser's CSRF token.
        for fields in ({}, {"csrf": "guessed"}):
            page = await alice.post(path, fields)
            self.assertEqual(page.status, 403, page)
            self.assertNotIn("__Host-cpushare-session", alice.cookies)
        # The link still works for whoever presses its button.
        page = await self.useLink(self.browser(), path)
        self.assertEqual((page.status, page.location), (303, "/"))

    async def test_a_login_link_as_another_account_ends_the_session_it_replaces(self):
        alice = await self.account("alice")
        bob = await self.account("bob")
        browser = self.browser()
        await self.useLink(browser, (await self.market.weblogins.loginLink(alice))[
            len(PUBLIC_URL):])
        aliceCookie = browser.cookies["__Host-cpushare-session"]
        path = (await self.market.weblogins.loginLink(bob))[len(PUBLIC_URL):]
        page = await browser.get(path)
        self.assertIn("This browser is logged in as alice now", page.text)
        page = await browser.post(path, {"csrf": page.csrf()})
        self.assertEqual(page.status, 303)
        self.assertIn("bob", (await browser.get("/vms")).text)
        # alice's old session cookie no longer logs anybody in.
        stale = self.browser()
        stale.cookies["__Host-cpushare-session"] = aliceCookie
        self.assertEqual((await stale.get("/vms")).status, 303)

    async def test_a_login_link_expires_after_five_minutes(self):
        alice = await self.account("alice")
        url = await self.market.weblogins.loginLink(alice)
        browser = self.browser()
        page = await browser.get(url[len(PUBLIC_URL):])
        self.reactor.advance(weblogin.LINK_LIFETIME + 1)
        self.assertEqual((await browser.get(url[len(PUBLIC_URL):])).status, 403)
        page = await browser.post(url[len(PUBLIC_URL):], {"csrf": page.csrf()})
        self.assertEqual(page.status, 403)
        self.assertNotIn("__Host-cpushare-session", browser.cookies)

    async def test_guessed_and_malformed_tokens_log_nobody_in(self):
        await self.account("alice")
        for token in (secrets.token_urlsafe(32), "a", "%00" * 50, "x" * 100_00):
            page = await self.browser().get("/login/" + token)
            self.assertIn(page.status, (403, 404), token)
            self.assertNotIn("Traceback", page.text)

    async def test_an_account_holds_a_few_unused_links(self):
        alice = await self.account("alice")
        urls = [await self.market.weblogins.loginLink(alice) for _ in range(20)]
        count = await self.store.run(
            lambda c: c.execute("SELECT COUNT(*) FROM web_login_tokens").fetchone()[0])
        self.assertEqual(count, weblogin.LINKS_PER_ACCOUNT)
        page = await self.useLink(self.browser(), urls[-1][len(PUBLIC_URL):])
        self.assertEqual(page.status, 303)


class CSRFTests(SiteCase):

    async def test_a_post_without_the_sessions_token_is_refused(self):
        alice = await self.loggedIn("alice")
        bob = await self.loggedIn("bob")
        bobsToken = (await bob.get("/vms")).csrf()
        for fields in ({}, {"csrf": ""}, {"csrf": bobsToken}, {"csrf": "x" * 43}):
            page = await alice.post("/logout", fields)
            self.assertEqual(page.status, 403, fields)
            self.assertIn("did not come from this site", page.text)
            self.assertEqual((await alice.get("/vms")).status, 200, "still logged in")
        page = await alice.post("/logout", {"csrf": (await alice.get("/vms")).csrf()})
        self.assertEqual((page.status, page.location), (303, "/login"))
        self.assertEqual((await alice.get("/vms")).status, 303)
        self.assertEqual((await bob.get("/vms")).status, 200, "bob is still in")

    async def test_the_login_form_needs_its_own_token(self):
        await self.account("alice", PASSWORD)
        browser = self.browser()
        for fields in ({}, {"csrf": "x" * 43}):
            page = await browser.post("/login", dict(fields, name="alice", password=PASSWORD))
            self.assertEqual(page.status, 403)
        # A token from another browser's form is not this one's.
        other = await self.browser().get("/login")
        await browser.get("/login")
        page = await browser.post("/login", {"name": "alice", "password": PASSWORD,
                                             "csrf": other.csrf()})
        self.assertEqual(page.status, 403)
        self.assertNotIn("__Host-cpushare-session", browser.cookies)

    async def test_an_api_post_carries_the_token_in_a_header(self):
        alice = await self.loggedIn("alice")
        token = (await alice.get("/vms")).csrf()
        page = await alice.post("/api/nothing", {"csrf": token})
        self.assertEqual(page.status, 403, "a form field is not the header")
        page = await alice.post("/api/nothing", {}, headers={"X-CSRF-Token": token})
        self.assertEqual(page.status, 404)


class LimitTests(SiteCase):

    async def attempt(self, name, password, host="198.51.100.7", forwardedFor=None):
        browser = self.browser(host)
        form = await browser.get("/login")
        headers = {"X-Forwarded-For": forwardedFor} if forwardedFor else None
        return await browser.post("/login", {"name": name, "password": password,
                                             "csrf": form.csrf()}, headers=headers)

    async def test_five_wrong_passwords_for_a_name_stop_its_logins_for_15_minutes(self):
        await self.account("alice", PASSWORD)
        with LogCapture() as log:
            for i in range(auth.FAILURES):
                page = await self.attempt("alice", f"guess number {i}",
                                          host=f"203.0.113.{i}")
                self.assertEqual(page.status, 403)
                self.assertIn("wrong name or password", page.text)
        [warned] = [t for t in log.texts() if "stop for a while" in t]
        self.assertIn("'alice'", warned)
        page = await self.attempt("alice", PASSWORD, host="192.0.2.99")
        self.assertEqual(page.status, 429)
        self.assertIn("too many failed logins for this account: try again in 15 minutes",
                      page.text)
        self.assertIn("cpushare web", page.text)
        self.reactor.advance(auth.WINDOW - 60)
        self.assertEqual((await self.attempt("alice", PASSWORD)).status, 429)
        self.reactor.advance(61)
        self.assertEqual((await self.attempt("alice", PASSWORD)).status, 303)

    async def test_five_failures_from_an_address_stop_its_logins(self):
        await self.account("alice", PASSWORD)
        for i in range(auth.FAILURES):
            await self.attempt(f"nobody{i}", "whatever password", host="203.0.113.5")
        page = await self.attempt("alice", PASSWORD, host="203.0.113.5")
        self.assertEqual(page.status, 429)
        self.assertIn("too many failed logins for your address", page.text)
        self.assertEqual((await self.attempt("alice", PASSWORD, host="203.0.113.6")).status,
                         303)

    async def test_behind_a_trusted_proxy_the_forwarded_address_counts(self):
        await self.account("alice", PASSWORD)
        proxy = "192.0.2.50"
        self.site.trustedProxies = frozenset([proxy])
        for i in range(auth.FAILURES):
            await self.attempt(f"nobody{i}", "whatever password", host=proxy,
                               forwardedFor=f"10.9.9.9, 203.0.113.{i}")
        page = await self.attempt("alice", PASSWORD, host=proxy, forwardedFor="203.0.113.77")
        self.assertEqual(page.status, 303, "each browser behind the proxy counts apart")
        # A browser that is not the proxy cannot choose its address.
        for i in range(auth.FAILURES):
            await self.attempt(f"other{i}", "whatever password", host="203.0.113.9",
                               forwardedFor=f"198.18.0.{i}")
        page = await self.attempt("alice", PASSWORD, host="203.0.113.9",
                                  forwardedFor="198.18.0.99")
        self.assertEqual(page.status, 429)

    async def test_a_flood_of_logins_is_refused_as_busy_not_queued(self):
        await self.account("alice", PASSWORD)
        logins = self.market.weblogins
        for _ in range(weblogin.HASHES_AT_ONCE):
            logins._hashing.acquire()
        waiting = [defer.ensureDeferred(logins.checkPassword("alice", "x" * 10))
                   for _ in range(weblogin.HASHES_WAITING)]
        page = await self.attempt("alice", PASSWORD)
        self.assertEqual(page.status, 503)
        self.assertIn("busy", page.text)
        for _ in range(weblogin.HASHES_AT_ONCE):
            logins._hashing.release()
        self.assertEqual(await defer.gatherResults(waiting), [None] * len(waiting))
        self.assertEqual((await self.attempt("alice", PASSWORD)).status, 303)

    def test_the_limits_memory_is_bounded(self):
        limits = auth.LoginLimits(self.reactor, remembered=100)
        for i in range(10_000):
            limits.failed(f"name{i}" * 50, f"10.{i // 256 % 256}.{i % 256}.1")
        self.assertLessEqual(limits.size(), 100 * auth.FAILURES)
        self.assertLessEqual(len(limits._seen), 100)


class AdminTests(SiteCase):

    async def test_only_web_administrators_see_the_operators_pages(self):
        alice = await self.loggedIn("alice")
        page = await alice.get("/admin")
        self.assertEqual(page.status, 403)
        self.assertIn("for the market's operators only", page.shown)
        self.assertNotIn('href="/admin"', (await alice.get("/")).text)
        root = await self.loggedIn("root", admin=True)
        page = await root.get("/admin")
        self.assertEqual(page.status, 200)
        self.assertIn('href="/admin"', (await root.get("/")).text)


class CommandTests(SiteCase):
    """SetWebPassword and WebLoginLink over a client's certificate connection."""

    @defer.inlineCallbacks
    def client(self, name):
        key, cert = yield self.register(name)
        session = yield self.connect("cli", key, cert)
        return session

    async def test_a_client_sets_its_password_and_gets_a_link(self):
        session = await self.client("alice")
        for short, problem in (("", "too short"), ("123456789", "too short"),
                               ("x" * 1025, "too long")):
            try:
                await session.control.callRemote(commands.SetWebPassword, password=short)
            except commands.BadRequest as e:
                self.assertIn(problem, str(e))
            else:
                self.fail(f"{short!r} was taken")
        await session.control.callRemote(commands.SetWebPassword, password=PASSWORD)
        browser = self.browser()
        page = await browser.post("/login", {"name": "alice", "password": PASSWORD,
                                             "csrf": (await browser.get("/login")).csrf()})
        self.assertEqual(page.status, 303, page)
        answer = await session.control.callRemote(commands.WebLoginLink)
        self.assertTrue(answer["url"].startswith(PUBLIC_URL + "/login/"))
        browser = self.browser()
        path = answer["url"][len(PUBLIC_URL):]
        page = await browser.post(path, {"csrf": (await browser.get(path)).csrf()})
        self.assertEqual(page.status, 303)
        self.assertNotIn(PASSWORD, repr(await self.store.run(
            lambda c: c.execute("SELECT * FROM web_passwords").fetchall())))

    async def test_a_market_without_a_site_gives_no_link(self):
        session = await self.client("alice")
        self.market.weblogins.publicUrl = lambda: None
        try:
            await session.control.callRemote(commands.WebLoginLink)
        except commands.NotPermitted as e:
            self.assertIn("no web site", str(e))
        else:
            self.fail("a link without a site")

    async def test_a_connection_without_hello_sets_nothing(self):
        key, cert = await self.register("alice")
        session = await self.connect("cli", key, cert, hello=False)
        try:
            await session.control.callRemote(commands.SetWebPassword, password=PASSWORD)
        except commands.CPUShareError as e:
            self.assertIn("hello", str(e))
        else:
            self.fail("set without hello")
