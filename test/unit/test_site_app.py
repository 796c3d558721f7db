"""
What every page of the web site carries, whoever asks: the security
headers, no inline script or style, a page for a path that does not exist
and for a failure (never a traceback), escaped text, the static files; and
the PayPal pages and the revocation list still served beside it.
"""

import html.parser

from cpushare.server.site.app import HSTS_MAX_AGE

from test.fakemarket import LogCapture
from test.sitebrowser import SiteCase

PAGES = ["/", "/login", "/logout", "/admin", "/nothing", "/login/expired-token",
         "/paypal/return?n=x", "/paypal/cancel?n=x", "/orders/new", "/vms", "/images",
         "/funds", "/statement", "/seller"]


class InlineCode(html.parser.HTMLParser):
    """Collects what a Content-Security-Policy without 'unsafe-inline' would refuse."""

    def __init__(self):
        html.parser.HTMLParser.__init__(self)
        self.found = []

    def handle_starttag(self, tag, attrs):
        names = {name for name, _ in attrs}
        if tag == "script" and "src" not in names:
            self.found.append("an inline <script>")
        if tag == "style":
            self.found.append("a <style> element")
        if "style" in names:
            self.found.append(f"a style attribute on <{tag}>")
        self.found += [f"an event handler {n} on <{tag}>" for n in names if n.startswith("on")]
        for name, value in attrs:
            if value and value.strip().lower().startswith("javascript:"):
                self.found.append(f"a javascript: URL in <{tag} {name}>")


def inlineCode(text):
    parser = InlineCode()
    parser.feed(text)
    return parser.found


class HeaderTests(SiteCase):

    async def everyPage(self):
        """Each page as nobody, as an account and as an administrator."""
        visitors = [self.browser(), await self.loggedIn("alice"),
                    await self.loggedIn("root", admin=True)]
        for browser in visitors:
            for path in PAGES:
                yield path, await browser.get(path)

    async def test_every_page_carries_the_security_headers(self):
        async for path, page in self.everyPage():
            headers = page.headers
            csp = headers["content-security-policy"]
            directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
            self.assertEqual(directives["default-src"], "'self'", path)
            self.assertEqual(directives["script-src"], "'self'", path)
            self.assertEqual(directives["style-src"], "'self'", path)
            self.assertEqual(directives["frame-ancestors"], "'none'", path)
            self.assertNotIn("unsafe", csp, path)
            self.assertEqual(headers["referrer-policy"], "no-referrer", path)
            self.assertEqual(headers["x-content-type-options"], "nosniff", path)
            self.assertEqual(headers["strict-transport-security"], f"max-age={HSTS_MAX_AGE}")
            self.assertNotIn("server", headers, path)
            self.assertEqual(headers["content-type"], "text/html; charset=utf-8", path)

    async def test_no_page_holds_inline_script_or_style(self):
        async for path, page in self.everyPage():
            self.assertEqual(inlineCode(page.text), [], path)
            if page.status != 303:
                self.assertIn('<link rel="stylesheet" href="/static/site.css">', page.text,
                              path)

    async def test_a_page_that_does_not_exist_is_a_404_page(self):
        for path in ("/nothing", "/vms/7/../../etc/passwd", "/login/a/b", "/static/nothing.css",
                     "/" + "x" * 5000):
            page = await self.browser().get(path)
            self.assertEqual(page.status, 404, path)
            self.assertNotIn("Traceback", page.text)
        page = await self.browser().get("/nothing")
        self.assertIn("There is no such page on this market", page.text)
        self.assertIn("<title>Not found - CPUShare</title>", page.text)

    async def test_a_failure_is_a_page_with_a_message_and_logged(self):
        browser = await self.loggedIn("alice")

        async def broken(secret):
            raise RuntimeError("the database went away: secret detail")

        self.market.weblogins.session = broken
        with LogCapture() as log:
            page = await browser.get("/")
        self.assertEqual(page.status, 500)
        self.assertIn("Something went wrong", page.text)
        self.assertNotIn("Traceback", page.text)
        self.assertNotIn("secret detail", page.text)
        self.assertEqual(len(log.failures), 1)
        self.assertTrue(any("GET / failed" in t for t in log.texts()), log.texts())
        # A POST fails the same way (in its CSRF check).
        with LogCapture() as log:
            page = await browser.post("/logout", {"csrf": "x"})
        self.assertEqual(page.status, 500)
        self.assertEqual(len(log.failures), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    async def test_a_method_a_page_does_not_take_is_refused_with_a_page(self):
        browser = await self.loggedIn("alice")
        token = (await browser.get("/")).csrf()
        page = await browser.post("/", {"csrf": token})
        self.assertEqual(page.status, 405)
        self.assertIn("GET", page.headers["allow"])
        page = await browser.request("PUT", "/")
        self.assertEqual(page.status, 403)

    async def test_what_a_visitor_typed_is_shown_escaped(self):
        browser = self.browser()
        form = await browser.get("/login")
        name = '<script>alert("x")</script>'
        page = await browser.post("/login", {"name": name, "password": "wrong password",
                                             "next": '"><script>', "csrf": form.csrf()})
        self.assertNotIn("<script>", page.text)
        self.assertIn("&lt;script&gt;", page.text)
        self.assertEqual(inlineCode(page.text), [])

    async def test_the_style_sheet_is_served_and_nothing_else_of_the_package(self):
        page = await self.browser().get("/static/site.css")
        self.assertEqual(page.status, 200)
        self.assertTrue(page.headers["content-type"].startswith("text/css"))
        self.assertIn("public", page.headers["cache-control"])
        self.assertIn("header.top", page.text)
        for path in ("/static/", "/static/../app.py", "/static/%2e%2e/app.py",
                     "/static/..%2fapp.py", "/static/../templates/base.html"):
            page = await self.browser().get(path)
            self.assertIn(page.status, (403, 404), path)
            self.assertNotIn("import", page.text, path)

    async def test_the_paypal_pages_are_still_served(self):
        page = await self.browser().get("/paypal/return?n=x&paymentId=PAY-1&PayerID=P")
        self.assertIn(page.status, (200, 400, 404, 409), page)
        self.assertIn('id="message"', page.text)
        page = await self.browser().get("/ca.crl")
        self.assertEqual(page.status, 404)


class InsecureSiteTests(SiteCase):
    """A site served without TLS (tests, a local proxy): no HSTS, no Secure cookies."""

    secure = False

    async def test_no_hsts_and_plain_cookies(self):
        browser = await self.loggedIn("alice")
        page = await browser.get("/")
        self.assertNotIn("strict-transport-security", page.headers)
        self.assertIn("cpushare-session", browser.cookies)
        self.assertEqual(page.status, 200)
