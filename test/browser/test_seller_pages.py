"""
The seller's and the operator's pages in a real headless Chromium, on a
real cpushare-server: log in with the link `cpushare web` prints, change
the seller's terms through the form (a bad price first: the market's
message on the page), suspend an account after the confirm page, with no
Content-Security-Policy violation and nothing loaded from another host.
The screenshots are the documentation's (docs/seller.md, docs/operator.md).
"""

import re

import pytest

from test.integration.conftest import cpushare

pytestmark = pytest.mark.slow


def loginLink(webMarket, home):
    done = cpushare(home, "web", "--no-open")
    assert done.status == 0, done
    [link] = re.findall(r"https://\S+", done.stdout)
    return link


def submit(browser, action, **fields):
    """Fill the form posting to C{action} and send it; returns the page's title."""
    form = browser.find_element("css selector", f'form[action="{action}"]')
    for name, value in fields.items():
        box = form.find_element("name", name)
        box.clear()
        box.send_keys(value)
    browser.follow(form.find_element("css selector", "button[type=submit]"))
    return browser.title


def violations(browser):
    """The console's complaints (the refused form's 400 status is the test's own)."""
    return [entry["message"] for entry in browser.get_log("browser")
            if "Content Security Policy" in entry["message"] or (
                entry["level"] == "SEVERE" and "status of 400" not in entry["message"])]


def test_a_seller_changes_its_terms_and_an_operator_suspends_an_account(
        browser, webMarket, tmp_path):
    sam = webMarket.register(tmp_path / "sam", "sam", funds=None)
    webMarket.register(tmp_path / "bob", "bob", funds=None)
    assert webMarket.admin("web-admin", "sam").status == 0
    browser.requested()
    browser.logInWithLink(loginLink(webMarket, sam), "sam")
    browser.get_log("browser")

    assert browser.open("/seller").startswith("Selling")
    submit(browser, "/seller/terms", price="-1")
    message = browser.find_element("id", "message").text
    assert message.startswith("price: '-1' is not an amount"), message
    assert browser.find_element("id", "price").get_attribute("value") == "-1"
    submit(browser, "/seller/terms", price="0.05", country="IT")
    assert browser.current_url.endswith("/seller?terms=changed")
    assert browser.find_element("id", "price").get_attribute("value") == "0.05"
    assert len(browser.find_elements("css selector", "svg.chart")) == 2
    browser.screenshot("seller")

    browser.open("/admin")
    assert "CPUShare" in browser.title
    browser.screenshot("admin")
    row = browser.find_element("xpath", "//tr[td[text()='bob']]")
    row.find_element("name", "reason").send_keys("testing the page")
    browser.follow(row.find_element("css selector", "button[type=submit]"))
    assert "Suspend the account bob?" in browser.find_element("id", "confirm").text
    browser.follow(browser.find_element("css selector", 'form[action="/admin/suspend"] button'))
    assert "bob is suspended" in browser.find_element("id", "done").text
    accounts = webMarket.admin("accounts")
    assert re.search(r"bob.*suspended", accounts.stdout), accounts

    assert violations(browser) == []
    assert browser.foreignRequests() == []
