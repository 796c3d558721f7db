"""
The browser harness end to end: a real headless Chromium loads the web
port of a real cpushare-server over HTTPS, trusting the market's CA the
way a buyer's browser would, and nothing else.
"""

import pytest

PNG = b"\x89PNG\r\n\x1a\n"

pytestmark = pytest.mark.slow


def test_the_market_page_loads_over_the_markets_tls_in_a_real_browser(browser, browsers):
    browser.requested()
    title = browser.open("/")
    assert "CPUShare" in title, title
    # The page came from the market and from nowhere else.
    assert browser.current_url == browser.base + "/"
    assert browser.foreignRequests() == []
    shot = browser.screenshot("smoke")
    assert shot.read_bytes().startswith(PNG)
    # A page that loads from elsewhere would be seen.
    browser.open("data:text/html,<img src='https://cdn.example.invalid/logo.png'>")
    assert browser.foreignRequests() == ["https://cdn.example.invalid/logo.png"]

    # A browser that does not trust the market's CA gets no page from it:
    # the harness ignores no certificate error.
    stranger = browsers(ca=None)
    assert "CPUShare" not in stranger.open("/")
