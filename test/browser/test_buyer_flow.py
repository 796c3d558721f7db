"""
A buyer's day in a real browser: the real cpushare-server with its web
port and PayPal set up (pointed at the PayPal fake), a real seller booting
one real QEMU VM (TCG), the buyer program giving it an address, and
headless Chromium.  The buyer logs in with the link `cpushare web` prints,
adds funds through the PayPal fake's approval page, screens the sellers on
the market page, uploads its livecd on the images page, reviews and places
an order with the order form, watches the VM run with its address on /vms,
reads its console, cancels the order, finds the charge in its statement and
downloads it as CSV.  Each step leaves a screenshot in
docs/screenshots/ for docs/buyer.md.
"""

import re
from hashlib import sha256

import pytest
from selenium.webdriver.common.by import By

from test.browser.conftest import PAGE_TIMEOUT
from test.integration.conftest import cpushare, waitUntil
from test.integration.test_funds import PayPalFake, startPaidMarket
from test.vm.test_market_vms import BOOT_TIMEOUT, buildJobISO, startBuyer, startSeller

pytestmark = pytest.mark.slow

JOB = "#!/bin/sh\necho hello from the browser test on $(hostname)\n"


@pytest.fixture
def paypal(processes, tmp_path):
    return PayPalFake(processes, tmp_path)


@pytest.fixture
def webMarket(processes, tmp_path, paypal):
    """The market of this module takes payments (5% commission), through the fake."""
    return startPaidMarket(processes, tmp_path, paypal)


def text(browser, css):
    return browser.find_element(By.CSS_SELECTOR, css).text


def vmRow(browser, vm):
    """The cells of VM C{vm}'s row on /vms, by their data-key."""
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-vm="{vm}"]')
    return {cell.get_attribute("data-key"): cell.text
            for cell in row.find_elements(By.CSS_SELECTOR, "td[data-key]")}


def test_a_buyer_adds_funds_watches_its_vm_cancels_it_and_downloads_its_statement(
        webMarket, paypal, browser, processes, tmp_path):
    market = webMarket
    alice = market.register(tmp_path / "alice", "alice", funds=None)
    sam = market.register(tmp_path / "sam", "sam")
    startSeller(processes, sam, cores=1, memory=512)
    startBuyer(processes, alice, None, "10.79.0.0")
    iso = buildJobISO(tmp_path / "job", JOB, network=True)

    # Log in with the link `cpushare web` prints: its page, then its button.
    done = cpushare(alice, "web", "--no-open")
    assert done.status == 0, done
    [link] = re.findall(r"https://\S+", done.stdout)
    browser.requested()
    browser.logInWithLink(link, "alice")
    assert browser.current_url == market.webUrl + "/"

    # Add funds: the form, PayPal's approval page (the fake approves), back.
    browser.open("/funds")
    assert text(browser, "#funds") == "0.00 USD"
    browser.screenshot("buyer-funds-empty")
    browser.find_element(By.ID, "amount").send_keys("20.00")
    browser.find_element(By.CSS_SELECTOR, "form.funds button").click()
    waitUntil(lambda: "Funds added" in browser.page_source,
              "the market's page after PayPal", PAGE_TIMEOUT, processes, 0.5)
    assert browser.current_url.startswith(market.webUrl + "/paypal/return?")
    assert "20.00 USD paid, 19.00 added to your CPUShare funds" in browser.page_source
    browser.open("/funds")
    assert text(browser, "#funds") == "19.00 USD"
    browser.screenshot("buyer-funds")
    [payment] = paypal.state()["payments"]
    assert payment["state"] == "approved"

    # The market: sam is online; a price screen excludes it, with the reason.
    browser.open("/")
    sellers = [row.text for row in browser.find_elements(By.CSS_SELECTOR, "table.sellers tbody tr")]
    assert len(sellers) == 1 and sellers[0].startswith("sam "), sellers
    browser.find_element(By.NAME, "max_price").send_keys("0.000001")
    browser.find_element(By.NAME, "explain").click()
    browser.follow(browser.find_element(By.CSS_SELECTOR, "form.filters button"))
    waitUntil(lambda: browser.find_elements(By.CSS_SELECTOR, "tr.excluded"),
              "sam listed as excluded", PAGE_TIMEOUT, processes, 0.5)
    assert "0 of the sellers online pass these screens" in text(browser, "#summary")
    excluded = text(browser, "tr.excluded td:last-child")
    assert "price" in excluded, excluded
    browser.screenshot("buyer-market")

    # The livecd, uploaded on the images page (its script shows the progress).
    browser.open("/images")
    assert "You have no images yet." in browser.page_source
    browser.find_element(By.NAME, "name").send_keys("browser job")
    browser.find_element(By.NAME, "image").send_keys(str(iso))
    browser.find_element(By.CSS_SELECTOR, "form.upload button").click()
    def stored():
        return any("is stored" in shown.text for shown in browser.find_elements(By.ID, "message"))

    waitUntil(stored, "the stored message on /images", 300, processes, 1.0)
    [row] = browser.find_elements(By.CSS_SELECTOR, "table.images tbody tr")
    cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
    assert cells[0] == "browser job" and cells[1] == str(iso.stat().st_size), cells
    assert cells[2] == sha256(iso.read_bytes()).hexdigest(), cells
    browser.screenshot("buyer-images")

    # The order form, from the image's Order link: review, then place.
    browser.follow(row.find_element(By.LINK_TEXT, "Order"))
    for name, value in (("vms", "1"), ("cores", "1"), ("memory", "256")):
        field = browser.find_element(By.NAME, name)
        field.clear()
        field.send_keys(value)
    browser.follow(browser.find_element(By.CSS_SELECTOR, 'button[name="review"]'))
    waitUntil(lambda: browser.find_elements(By.ID, "review"), "the order's review",
              PAGE_TIMEOUT, processes, 0.5)
    review = text(browser, "#review")
    assert "1 of 1 VMs would be placed on sellers now" in review, review
    assert text(browser, "table.plan tbody tr td:nth-child(2)") == "sam"
    assert float(text(browser, "#hold")) > 0, review
    browser.screenshot("buyer-order")
    browser.follow(browser.find_element(By.ID, "place"))
    waitUntil(lambda: browser.current_url.startswith(market.webUrl + "/vms?done=placed-"),
              "/vms after placing", PAGE_TIMEOUT, processes, 0.5)
    assert "is placed" in text(browser, "#message")
    [vm] = [int(row.get_attribute("data-vm"))
            for row in browser.find_elements(By.CSS_SELECTOR, "tr[data-vm]")]

    # The VM runs and gets its address, on /vms.
    def addressed():
        browser.open("/vms")
        cells = vmRow(browser, vm)
        assert cells["state"] not in ("failed", "stopped", "lost"), cells
        return cells if cells["ip"] else None

    cells = waitUntil(addressed, f"VM {vm} running with an address on /vms", BOOT_TIMEOUT,
                      processes, 2.0)
    assert (cells["state"], cells["seller"]) == ("running", "sam"), cells
    assert cells["ip"].startswith("10.79.0."), cells
    browser.screenshot("buyer-vms")

    # Its console, from the page's link.
    browser.follow(browser.find_element(By.CSS_SELECTOR, f'a[href="/vms/{vm}/console"]'))
    waitUntil(lambda: "hello from the browser test" in text(browser, "#console")
              or browser.refresh(), "the job's line on the console page", BOOT_TIMEOUT,
              processes, 2.0)
    browser.screenshot("buyer-console")

    # Cancel the order: asked, then done.
    browser.open("/vms")
    order_ = browser.find_element(By.CSS_SELECTOR, 'ul.orders a').get_attribute("href")
    browser.open(order_)
    browser.screenshot("buyer-cancel")
    browser.follow(browser.find_element(By.CSS_SELECTOR, "main form button"))
    waitUntil(lambda: "is cancelled" in text(browser, "#message"), "the cancelled message",
              PAGE_TIMEOUT, processes, 0.5)
    assert vmRow(browser, vm)["reason"] == "the order was cancelled"

    # The charge, in the statement and in its CSV.
    def charged():
        browser.open("/statement")
        return "charge" in text(browser, "#statement") if browser.find_elements(
            By.ID, "statement") else False

    waitUntil(charged, "the VM's charge in the statement", PAGE_TIMEOUT, processes, 2.0)
    assert "<svg" in browser.page_source
    browser.screenshot("buyer-statement")
    csv = browser.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        "fetch('/statement.csv').then(function (r) {"
        " return r.text().then(function (t) {"
        "  done([r.headers.get('content-type'), r.headers.get('content-disposition'), t]); });"
        "});")
    kind, disposition, body = csv
    assert kind == "text/csv; charset=utf-8"
    assert disposition == 'attachment; filename="cpushare-statement.csv"'
    lines = body.splitlines()
    assert lines[0].startswith("date,kind,account,memo,amount (USD),balance (USD)")
    assert any(",charge," in line for line in lines), body
    assert any(",deposit," in line for line in lines), body

    # Nothing came from another host but PayPal's approval page.
    foreign = [url for url in browser.foreignRequests() if not url.startswith(paypal.url)]
    assert foreign == []
