"""
The buyer's pages (cpushare/server/site/pages_buyer.py) on the market in
memory, through the web port's own stack: the market with its screens and
their reasons, images (upload, list, delete), the order form with its
review and placing; each as its owner, as another account and as nobody,
and with the input a careless or hostile browser sends.
"""

import hashlib
import io
import re

from cpushare.money import MICRO, formatAmount
from cpushare.protocol import commands
from cpushare.server import admin
from cpushare.server.db import store
from cpushare.server.db.store import Account
from cpushare.server.site import api, upload

from test.sitebrowser import SiteCase
from test.unit.test_orders import FakeProgram

BOUNDARY = "----cpushareTestBoundary7"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}".encode()


def multipart(fields, file=None, filename="livecd.iso", boundary=BOUNDARY, fileFirst=False):
    """A multipart/form-data body of C{fields} and a file field "image" holding C{file}."""
    parts = [(f'Content-Disposition: form-data; name="{name}"'.encode(), value.encode())
             for name, value in fields.items()]
    if file is not None:
        part = (f'Content-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                'Content-Type: application/octet-stream'.encode(), file)
        parts.insert(0, part) if fileFirst else parts.append(part)
    body = b""
    for headers, value in parts:
        body += b"--" + boundary.encode() + b"\r\n" + headers + b"\r\n\r\n" + value + b"\r\n"
    return body + b"--" + boundary.encode() + b"--\r\n"


class BuyerPagesCase(SiteCase):

    withImages = True

    async def seller(self, name, cores=2, memory=2048):
        """A seller program of a new account C{name}, offering room."""
        who = await self.register(name)
        seller = await self.connect("seller", *who, sessionClass=FakeProgram)
        await seller.control.callRemote(commands.Offer, cores=cores, memory=memory)
        return seller

    async def upload(self, browser, data, name="my livecd", csrf=None, **kw):
        """The answer to uploading C{data} with the images page's form."""
        if csrf is None:
            csrf = (await browser.get("/images")).csrf()
        fields = {"name": name} if csrf is False else {"csrf": csrf, "name": name}
        body = multipart(fields, data, **kw)
        return await browser.request(
            "POST", "/images", body,
            {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})

    async def accountNamed(self, name):
        """The account record of C{name}, as the site's login gives it."""
        def find(cursor):
            cursor.execute("SELECT id FROM accounts WHERE name = ?", (name,))
            return cursor.fetchone()[0]
        return Account(await self.store.run(find), name, "now")

    async def imageOf(self, browser, data=b"livecd" * 1000):
        page = await self.upload(browser, data)
        self.assertEqual(page.status, 303, page)
        return hashlib.sha256(data).hexdigest()


class MarketPageTests(BuyerPagesCase):

    async def test_the_market_lists_the_sellers_online_with_their_figures(self):
        await self.seller("sam")
        alice = await self.loggedIn("alice")
        page = await alice.get("/")
        self.assertEqual(page.status, 200, page)
        self.assertIn("<td>sam</td>", page.text)
        self.assertIn("1 of the sellers online pass these screens", page.shown)
        self.assertIn("Max price a core-hour", page.text)
        # Nobody sees the login's link, not the sellers.
        nobody = await self.browser().get("/")
        self.assertEqual(nobody.status, 200)
        self.assertNotIn("sam", nobody.text)
        self.assertIn('href="/login"', nobody.text)

    async def test_a_screen_excludes_and_explain_says_why(self):
        await self.seller("sam")
        alice = await self.loggedIn("alice")
        page = await alice.get("/?max_price=0.000001")
        self.assertEqual(page.status, 200, page)
        self.assertIn("0 of the sellers online pass these screens", page.shown)
        self.assertNotIn("<td>sam</td>", page.text)
        self.assertIn('value="0.000001"', page.text)
        page = await alice.get("/?max_price=0.000001&explain=1")
        self.assertIn("<td>sam</td>", page.text)
        answer = await api.call(self.market, await self.accountNamed("alice"), "sellers",
                                {"max_price": 1, "explain": True})
        self.assertIn(answer["sellers"][0]["excluded"], page.shown)
        self.assertIn("price", answer["sellers"][0]["excluded"])

    async def test_absurd_screens_are_refused_on_the_page_with_the_form_refilled(self):
        alice = await self.loggedIn("alice")
        cases = {
            "max_price=ten": "the maximum price: 'ten' is not an amount",
            "min_rating=7": "the minimum rating",
            "countries=Narnia%21": "country",
            "offset=-1": "offset must be a whole number",
            "surprise=1": "this form has no field 'surprise'",
            "replicas=99": "--replicas is 2 to",
        }
        for query, words in cases.items():
            page = await alice.get("/?" + query)
            self.assertEqual(page.status, 400, (query, page))
            message = re.search(r'<p class="problem" id="message">(.*?)</p>', page.shown, re.S)
            self.assertIsNotNone(message, page)
            self.assertIn(words, message.group(1))
            self.assertNotIn("Traceback", page.text)
        page = await alice.get("/?max_price=ten&min_cpu=5")
        self.assertIn('name="max_price" value="ten"', page.text)
        self.assertIn('name="min_cpu" value="5"', page.text)

    async def test_the_market_is_paged_with_a_link_to_the_next(self):
        await self.seller("sam")
        await self.seller("sue")
        alice = await self.loggedIn("alice")
        self.patch(commands, "SELLERS_PAGE", 1)
        page = await alice.get("/?min_rating=0")
        self.assertIn("Sellers 1 to 1 of 2", page.shown)
        nextPage = re.search(r'href="(/\?[^"]*)" rel="next"', page.shown).group(1)
        self.assertIn("offset=1", nextPage)
        self.assertIn("min_rating=0", nextPage)
        second = await alice.get(nextPage)
        self.assertIn("Sellers 2 to 2 of 2", second.shown)
        self.assertNotIn('rel="next"', second.text)


class ImagePagesTests(BuyerPagesCase):

    async def test_an_upload_is_stored_listed_and_orderable(self):
        alice = await self.loggedIn("alice")
        data = bytes(range(256)) * 5000
        page = await self.upload(alice, data, name="grid job")
        sha = hashlib.sha256(data).hexdigest()
        self.assertEqual((page.status, page.location), (303, "/images?stored=" + sha), page)
        listed = await alice.get(page.location)
        self.assertIn(f"Image {sha} is stored", listed.shown)
        self.assertIn("<td>grid job</td>", listed.text)
        self.assertIn(f'<td class="num">{len(data)}</td>', listed.text)
        with open(self.images.pathFor(sha), "rb") as f:
            self.assertEqual(f.read(), data)
        # The same image again is not stored twice.
        again = await self.upload(alice, data)
        self.assertEqual(again.location, "/images?held=1")
        self.assertEqual(len((await api.call(self.market, await self.accountNamed("alice"), "images"))
                             ["images"]), 1)
        # The file's own name when no name is given.
        other = await self.upload(alice, b"other" * 100, name="", filename="C:\\isos\\x.iso")
        self.assertEqual(other.status, 303, other)
        self.assertIn("<td>x.iso</td>", (await alice.get("/images")).text)

    async def test_an_encrypted_image_is_marked_as_one(self):
        alice = await self.loggedIn("alice")
        plain, sealed = b"p" * 1000, b"s" * 1000
        for data in (plain, sealed):
            self.assertEqual((await self.upload(alice, data)).status, 303)
        account = await self.accountNamed("alice")
        # As the market's key custody records an image's key (sealed).
        await self.store.run(store.setImageKey, account.id, hashlib.sha256(sealed).hexdigest(),
                             "00" * 60, "0" * 16)
        rows = re.findall(r"<tr>(.*?)</tr>", (await alice.get("/images")).text, re.S)
        marks = {re.search(r'class="sha">(\w+)<', r).group(1): re.findall(r"<td>(yes[^<]*|no)</td>", r)
                 for r in rows if 'class="sha"' in r}
        self.assertEqual(marks, {hashlib.sha256(plain).hexdigest(): ["no"],
                                 hashlib.sha256(sealed).hexdigest(): ["yes: trusted orders only"]})

    async def test_an_upload_over_the_quota_is_refused_with_a_message(self):
        alice = await self.loggedIn("alice")
        await self.imageOf(alice, b"a" * (2 * 1024 * 1024))
        page = await self.upload(alice, b"b" * (2 * 1024 * 1024))
        self.assertEqual(page.status, 413, page)
        self.assertIn("over its image quota of 3145728 bytes", page.shown)
        self.assertEqual(self.images.uploading, {})
        # A body larger than any account's quota is refused before it is all read.
        page = await self.upload(alice, b"c" * (self.imageQuota + 2 * upload.FORM_SLACK))
        self.assertEqual(page.status, 413, page)
        self.assertIn("larger than the", page.text)

    async def test_bad_upload_forms_get_a_message(self):
        alice = await self.loggedIn("alice")
        csrf = (await alice.get("/images")).csrf()
        for kw, words in [
            ({"data": b""}, "the file is empty"),
            ({"data": b"x" * 10, "name": "two\nlines"}, "on one line"),
            ({"data": None}, "choose an ISO file"),
        ]:
            page = await self.upload(alice, csrf=csrf, **kw)
            self.assertEqual(page.status, 400, (kw, page))
            self.assertIn(words, page.shown)
        # The token must come before the file: the page's form sends it so.
        page = await self.upload(alice, b"x" * 10, csrf=csrf, fileFirst=True)
        self.assertEqual(page.status, 403, page)
        # A file that is not the last field: the body does not end after it.
        body = multipart({"csrf": csrf}, b"x" * 10)[:-4] + b"\r\n"
        page = await alice.request("POST", "/images", body, {
            "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        self.assertEqual(page.status, 400, page)
        self.assertIn("the file must be the form's last field", page.shown)
        self.assertEqual(self.images.uploading, {})

    async def test_a_post_without_the_csrf_token_is_refused(self):
        alice = await self.loggedIn("alice")
        sha = await self.imageOf(alice)
        page = await self.upload(alice, b"y" * 100, csrf=False)
        self.assertEqual(page.status, 403, page)
        for path, fields in [(f"/images/{sha}/delete", {}),
                             ("/orders", {"image": sha, "vms": "1", "cores": "1",
                                          "memory": "256"})]:
            page = await alice.post(path, fields)
            self.assertEqual(page.status, 403, (path, page))
            page = await alice.post(path, dict(fields, csrf="forged"))
            self.assertEqual(page.status, 403, (path, page))
        self.assertIn(sha, (await alice.get("/images")).text)

    async def test_an_image_is_deleted_after_a_confirmation_only_by_its_owner(self):
        alice = await self.loggedIn("alice")
        bob = await self.loggedIn("bob", host="198.51.100.8")
        sha = await self.imageOf(alice)
        # Bob: as if it did not exist.
        page = await bob.get(f"/images/{sha}/delete")
        self.assertEqual(page.status, 404, page)
        page = await bob.post(f"/images/{sha}/delete", {"csrf": page.csrf()})
        self.assertEqual(page.status, 400, page)
        self.assertIn(f"you have no image {sha}", page.shown)
        self.assertNotIn(sha + "</code>", (await bob.get("/images")).text)
        # Alice: the confirmation, then the deletion.
        confirm = await alice.get(f"/images/{sha}/delete")
        self.assertEqual(confirm.status, 200, confirm)
        self.assertIn(f'action="/images/{sha}/delete"', confirm.text)
        self.assertIn(sha, (await alice.get("/images")).text)
        page = await alice.post(f"/images/{sha}/delete", {"csrf": confirm.csrf()})
        self.assertEqual((page.status, page.location), (303, "/images?deleted=1"))
        self.assertNotIn(sha, (await alice.get("/images")).text)
        page = await alice.get("/images/not-a-sha/delete")
        self.assertEqual(page.status, 404)

    async def test_nobody_is_sent_to_login(self):
        nobody = self.browser()
        for path in ("/images", "/orders/new", "/images/" + "0" * 64 + "/delete"):
            page = await nobody.get(path)
            self.assertEqual(page.status, 303, path)
            self.assertTrue(page.location.startswith("/login?next="), page.location)


class OrderPagesTests(BuyerPagesCase):

    async def test_the_form_has_every_option_and_trusted_computing(self):
        alice = await self.loggedIn("alice")
        sha = await self.imageOf(alice)
        page = await alice.get(f"/orders/new?image={sha}")
        self.assertEqual(page.status, 200, page)
        for name in ("image", "vms", "cores", "memory", "budget", "max_price", "max_net_fee",
                     "min_rating", "min_validated", "max_latency", "min_bandwidth", "min_cpu",
                     "countries", "not_countries", "replicas", "diverse"):
            self.assertIn(f'name="{name}"', page.text, name)
        self.assertIn(f'<option value="{sha}" selected>', page.text)
        self.assertIn('<input type="checkbox" name="trusted" value="1"> Trusted computing',
                      page.text)
        self.assertIn("only sellers whose TPM proves what booted their computer", page.text)
        self.assertIn("command line only", page.text)
        for choice in ("auto", "2", "5"):
            self.assertIn(f'<option value="{choice}"', page.text)

    async def test_review_shows_where_the_vms_go_and_what_is_held_then_place(self):
        await self.seller("sam")
        alice = await self.loggedIn("alice")
        account = await self.accountNamed("alice")
        await self.store.run(admin.credit, "alice", 100 * MICRO, "funds for the tests")
        sha = await self.imageOf(alice)
        page = await alice.get(f"/orders/new?image={sha}&vms=2&cores=1&memory=256"
                               "&max_price=5&review=1")
        self.assertEqual(page.status, 200, page)
        plan = await api.call(self.market, account, "place_order",
                              {"image": sha, "vms": 2, "cores": 1, "memory": 256,
                               "max_price": 5 * MICRO, "dry_run": True})
        self.assertEqual(plan["allocated"], 2)
        self.assertIn("2 of 2 VMs would be placed", page.shown)
        self.assertIn(f'<strong id="hold">{formatAmount(plan["hold"])}<', page.text)
        self.assertIn("<td>sam</td>", page.text)
        self.assertEqual((await api.call(self.market, account, "vms"))["vms"], [])
        # Place: the reviewed values are posted as they were.
        self.assertIn('<input type="hidden" name="max_price" value="5">', page.text)
        fields = dict(re.findall(r'<input type="hidden" name="([a-z_]+)" value="([^"]*)">',
                                 page.text))
        placed = await alice.post("/orders", fields)
        self.assertEqual(placed.status, 303, placed)
        order = int(placed.location.split("done=placed-")[1])
        shown = await alice.get(placed.location)
        self.assertIn(f"Order {order} is placed", shown.shown)
        vms = (await api.call(self.market, account, "vms"))["vms"]
        self.assertEqual([vm["order"] for vm in vms], [order, order])

    async def test_absurd_orders_are_refused_on_the_page_with_the_form_refilled(self):
        alice = await self.loggedIn("alice")
        sha = await self.imageOf(alice)
        base = {"image": sha, "vms": "1", "cores": "1", "memory": "256"}
        cases = [
            ({"vms": "1000000"}, "an order is for 1 to"),
            ({"cores": "lots"}, "cores must be a whole number, not 'lots'"),
            ({"memory": "1"}, "a VM has 64 to"),
            ({"budget": "-3"}, "the budget: '-3' is not an amount"),
            ({"replicas": "auto", "diverse": "planets"}, "--diverse 'planets' is not one of"),
            ({"image": "0" * 64}, "this account has no image"),
            ({"countries": "x" * 5000}, "countries"),
        ]
        csrf = (await alice.get("/orders/new")).csrf()
        for change, words in cases:
            fields = dict(base, **change)
            for page in [await alice.get("/orders/new?review=1&" + "&".join(
                             f"{k}={v}" for k, v in fields.items())),
                         await alice.post("/orders", dict(fields, csrf=csrf))]:
                self.assertEqual(page.status, 400, (change, page))
                message = re.search(r'<p class="problem" id="message">(.*?)</p>', page.shown,
                                    re.S)
                self.assertIsNotNone(message, (change, page))
                self.assertIn(words, message.group(1))
                self.assertIn('name="vms" value="%s"' % fields["vms"], page.text)
        self.assertEqual(self.market.orders.vms, {})

    async def test_another_accounts_image_cannot_be_ordered(self):
        alice = await self.loggedIn("alice")
        bob = await self.loggedIn("bob", host="198.51.100.8")
        sha = await self.imageOf(alice)
        page = await bob.get("/orders/new")
        self.assertNotIn(sha, page.text)
        placed = await bob.post("/orders", {"image": sha, "vms": "1", "cores": "1",
                                            "memory": "256", "csrf": page.csrf()})
        self.assertEqual(placed.status, 400)
        self.assertIn(f"this account has no image '{sha}'", placed.shown)


class UploadFormTests(BuyerPagesCase):

    def test_a_form_is_read_up_to_its_file_and_no_further(self):
        body = multipart({"csrf": "token", "name": "job"}, b"ISO" * 100000)
        args = {}
        form = upload.readForm(io.BytesIO(body), CONTENT_TYPE, args)
        self.assertEqual(args, {b"csrf": [b"token"], b"name": [b"job"]})
        self.assertEqual((form.problem, form.filename), (None, "livecd.iso"))
        self.assertEqual(body[form.start:form.end], b"ISO" * 100000)

    def test_a_hostile_form_is_refused_by_name_with_bounded_reading(self):
        cases = [
            (multipart({f"f{i}": "x" for i in range(20)}, b"x"), "more than 8 fields"),
            (multipart({"name": "x" * 5000}, b"x"), "a field of the form is too long"),
            (b"no boundary here" + b"x" * 100, "does not start with its boundary"),
            (b"--" + BOUNDARY.encode() + b"\r\n" + b"x" * (upload.FORM_HEAD + 10),
             "fields before the file are too long"),
        ]
        for body, words in cases:
            form = upload.readForm(io.BytesIO(body), CONTENT_TYPE, {})
            self.assertIn(words, form.problem)
        form = upload.readForm(io.BytesIO(b""), b"multipart/form-data", {})
        self.assertEqual(form.problem, "the form has no multipart boundary")

    async def test_a_body_over_a_megabyte_is_refused_unless_it_is_an_upload(self):
        alice = await self.loggedIn("alice")
        csrf = (await alice.get("/orders/new")).csrf()
        page = await alice.post("/orders", {"csrf": csrf, "countries": "x" * (2 * 1024**2)})
        self.assertEqual(page.status, 413, page)
        self.assertIn("larger than the 1048576 bytes", page.text)
        # Two megabytes of image are not: they fit the quota.
        await self.imageOf(alice, b"z" * (2 * 1024**2))
