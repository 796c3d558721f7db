"""
The browser tests' harness: a real cpushare-server with its web port on
127.0.0.1 (the integration tests' L{Market}), and a headless Chromium
driven by Selenium through Debian's chromium and chromium-driver.

The browser trusts the market's CA through an NSS database in a HOME of
its own, as a buyer who added the CA would: no certificate error is
ignored, so a page that loads proves the market's TLS is right.  Every
request the browser makes is recorded (Chromium's performance log), so a
test can prove a page loads nothing from another host.

Fixtures:

    webMarket   the market, started with --web; C{webMarket.webUrl} is its
                https://localhost:PORT.  A test module may define its own
                (a market taking payments, say) and the browser follows it.
    browser     a L{Browser} trusting C{webMarket}'s CA.
    browsers    makes more: C{browsers(ca=None)} trusts nobody's CA.

These tests are slow (test/conftest.py marks every test using C{browser})
and never skipped: without the browser they fail saying what to install
(tools/host-deps.sh installs it, as root, for `make test` and CI).
"""

import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from test.integration.conftest import (  # noqa: F401 (fixtures and hooks used here)
    LOOPBACK, Market, browserHome, processes, pytest_runtest_makereport)

ROOT = Path(__file__).resolve().parent.parent.parent
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1280, 900)
NETWORK = ("http", "https", "ws", "wss", "ftp")
PAGE_TIMEOUT = 60

MISSING = ("the browser tests need Debian's chromium, chromium-driver and libnss3-tools, and "
           "selenium in the virtualenv: run `make test` as root (tools/host-deps.sh installs "
           "them), or `sudo apt-get install chromium chromium-driver libnss3-tools` and "
           "`make setup`; missing: {}")


def _tools():
    """(chromium, chromedriver, certutil) paths; fails the test naming what is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (CHROMEDRIVER if os.path.exists(CHROMEDRIVER)
                                              else None)
    certutil = shutil.which("certutil")
    missing = [name for name, path in (("chromium", chromium), ("chromium-driver", driver),
                                       ("libnss3-tools", certutil)) if path is None]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        pytest.fail(MISSING.format(", ".join(missing)), pytrace=False)
    return chromium, driver, certutil


class Browser:
    """
    A headless Chromium under Selenium.  Attributes it does not have are
    the WebDriver's (C{browser.title}, C{browser.find_element(...)}).
    """

    def __init__(self, root, ca, base=None, name="browser"):
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        chromium, driverPath, certutil = _tools()
        self.base = base
        self.home = browserHome(Path(root) / f"{name}-home", ca, certutil)

        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for argument in ("--headless", "--disable-gpu", "--no-first-run",
                         "--disable-extensions", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         "--disable-dev-shm-usage", "--hide-scrollbars",
                         f"--window-size={WINDOW[0]},{WINDOW[1]}",
                         f"--user-data-dir={self.home / 'profile'}"):
            options.add_argument(argument)
        if os.geteuid() == 0:
            # Chromium's own process sandbox cannot run as root; this is not
            # about certificates, which are checked as usual.
            options.add_argument("--no-sandbox")
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
        self.log = Path(root) / f"{name}-chromedriver.log"
        # Chromium finds its NSS database under HOME.
        service = Service(executable_path=driverPath, log_output=str(self.log),
                          env=dict(os.environ, HOME=str(self.home)))
        self.driver = webdriver.Chrome(service=service, options=options)
        self.driver.set_page_load_timeout(PAGE_TIMEOUT)

    def __getattr__(self, name):
        return getattr(self.__dict__["driver"], name)

    def open(self, path):
        """Load C{path} of the market (or a whole URL); returns the page's title."""
        url = path if "://" in path else self.base + path
        self.driver.get(url)
        return self.driver.title

    def follow(self, element):
        """
        Click C{element} (a link or a form's button) and wait until the
        browser has left the page it was on: a click returns before the
        next page loads.
        """
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        page = self.driver.find_element(By.TAG_NAME, "html")
        element.click()

        def left(driver):
            try:
                page.tag_name
            except WebDriverException as e:
                # Stale, or Chromium's "Node ... does not belong to the
                # document": the old page is gone either way.
                return "stale" in str(e) or "does not belong to the document" in str(e)
            return False

        WebDriverWait(self.driver, PAGE_TIMEOUT).until(left)
        WebDriverWait(self.driver, PAGE_TIMEOUT).until(
            lambda driver: driver.execute_script("return document.readyState") == "complete")

    def logInWithLink(self, link, name):
        """
        Open a `cpushare web` link, check that its page names the account
        C{name}, and press its button: the browser is then on the market.
        """
        from selenium.webdriver.common.by import By

        self.open(link)
        shown = self.driver.find_element(By.ID, "link-account").text
        assert shown == f"This link logs this browser in as {name}.", shown
        self.follow(self.driver.find_element(By.ID, "login-link"))
        who = self.driver.find_elements(By.CSS_SELECTOR, "header .who")
        assert who and who[0].text == name, self.driver.page_source[:2000]

    def requested(self):
        """Every URL the browser asked for since the last call, in order."""
        urls = []
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message.get("method") == "Network.requestWillBeSent":
                urls.append(message["params"]["request"]["url"])
        return urls

    def foreignRequests(self):
        """
        The URLs of the network (http, https, ws, wss, ftp) requested since
        the last call that are not the market's own; the browser's own pages
        (chrome:, about:, data:) are not the network.
        """
        own = urlsplit(self.base)
        found = []
        for url in self.requested():
            parts = urlsplit(url)
            if parts.scheme in NETWORK and (parts.scheme, parts.netloc) != (own.scheme,
                                                                           own.netloc):
                found.append(url)
        return found

    def screenshot(self, name):
        """
        Save the whole page as docs/screenshots/NAME.png (for the user
        documentation), and return its path.
        """
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", name):
            raise ValueError(f"a screenshot's name is lowercase letters, digits and dashes,"
                             f" not {name!r}")
        height = self.driver.execute_script(
            "return Math.max(document.documentElement.scrollHeight,"
            " document.body ? document.body.scrollHeight : 0)")
        self.driver.set_window_size(WINDOW[0], max(WINDOW[1], min(int(height), 8000)))
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        if not self.driver.save_screenshot(str(path)):
            raise AssertionError(f"Chromium could not save the screenshot {path}")
        self.driver.set_window_size(*WINDOW)
        return path

    def quit(self):
        self.driver.quit()


def startWebMarket(processes, root, extra=()):
    """A market serving its web port on loopback; its C{webUrl} is https://localhost:PORT."""
    market = Market(processes, Path(root) / "market",
                    extra=["--web", f"tcp:0:interface={LOOPBACK}", *extra]).start()
    web = json.loads((market.data / "web.address").read_text())
    market.webUrl = f"https://localhost:{web['port']}"
    return market


@pytest.fixture
def webMarket(processes, tmp_path):
    return startWebMarket(processes, tmp_path)


@pytest.fixture
def browsers(tmp_path, webMarket):
    """Call with the CA to trust (None: none) to get a L{Browser}; all quit at teardown."""
    made = []

    def make(ca=webMarket.ca):
        browser = Browser(tmp_path, ca, webMarket.webUrl, name=f"browser{len(made) + 1}")
        made.append(browser)
        return browser

    yield make
    for browser in made:
        browser.quit()


@pytest.fixture
def browser(browsers):
    return browsers()
