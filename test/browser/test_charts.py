"""
The server's SVG charts in a real browser, inline in a page under the
strictest Content-Security-Policy (nothing allowed): they draw at their
size, with their colours, and the browser reports no violation.
"""

import calendar

import pytest

from cpushare.money import MICRO
from cpushare.server.site.charts import lineChart, priceChart

pytestmark = pytest.mark.slow

DAY = 86400
NOV_1 = calendar.timegm((2026, 11, 1, 0, 0, 0))
STRICT = "default-src 'none'"


def test_charts_draw_inline_under_a_policy_that_allows_nothing(browser, tmp_path):
    spent = [(NOV_1 + d * DAY, (d % 5) * MICRO) for d in range(30)]
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{STRICT}\">"
            "<title>charts</title></head><body>"
            + lineChart([("spent", spent)], "Spending", "spent a day", currency="USD")
            + priceChart(150_000, [100_000, 100_000, 200_000], currency="USD")
            + "</body></html>")
    path = tmp_path / "charts.html"
    path.write_text(page, encoding="utf-8")
    browser.get_log("browser")
    browser.open(path.as_uri())
    sizes = browser.execute_script(
        "return Array.from(document.querySelectorAll('svg.chart')).map(s => {"
        " const r = s.getBoundingClientRect(); return [r.width, r.height]; })")
    assert sizes == [[640, 240], [640, 240]]
    # The line is drawn in its colour, not left to defaults a policy stripped.
    stroke = browser.execute_script(
        "return getComputedStyle(document.querySelector('svg.chart polyline')).stroke")
    assert stroke == "rgb(31, 119, 180)"
    problems = [entry["message"] for entry in browser.get_log("browser")
                if "Content Security Policy" in entry["message"]
                or entry["level"] == "SEVERE"]
    assert problems == []
