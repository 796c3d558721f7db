"""
The web site's SVG charts (cpushare/server/site/charts.py): what they draw
lands where the axes say, hostile text stays text, and no data makes a
chart too big or a page broken.
"""

import calendar
import re
import xml.etree.ElementTree as ET

import pytest

from cpushare.money import MAX_AMOUNT, MICRO
from cpushare.server.site import charts
from cpushare.server.site.charts import ChartError, lineChart, priceChart

SVG = "{http://www.w3.org/2000/svg}"
# Everything a chart may contain: no script, style, link, image or foreign object.
ELEMENTS = {"svg", "title", "rect", "text", "g", "line", "polyline", "circle"}
DAY = 86400
NOV_1 = calendar.timegm((2026, 11, 1, 0, 0, 0))
HOSTILE = '</svg><script>alert("x")</script><a href="javascript:alert(1)">&amp;\x00\x1b'


def parse(svg):
    """The chart as an element tree, after checking it is self-contained."""
    root = ET.fromstring(svg)
    assert root.tag == SVG + "svg"
    for element in root.iter():
        assert element.tag.startswith(SVG), element.tag
        assert element.tag[len(SVG):] in ELEMENTS, element.tag
        for name, value in element.attrib.items():
            assert "href" not in name and name != "style" and not name.startswith("on"), name
            assert "url(" not in value and "javascript:" not in value, (name, value)
    return root


def texts(root):
    return ["".join(t.itertext()) for t in root.iter(SVG + "text")]


def ticks(root, kind):
    """{label: pixel} of a chart's x or y ticks."""
    found = {}
    for group in root.iter(SVG + "g"):
        if group.get("class") == kind:
            line = group.find(SVG + "line")
            label = "".join(group.find(SVG + "text").itertext())
            found[label] = float(line.get("x1" if kind == "xtick" else "y1"))
    return found


def polyline(root, series=0):
    group = next(g for g in root.iter(SVG + "g") if g.get("data-series") == str(series))
    points = group.find(SVG + "polyline").get("points").split()
    return [tuple(map(float, p.split(","))) for p in points]


def dayLabel(label):
    """An x tick label of November 2026 ("Nov 5") as unix time."""
    month, day = label.split()
    assert month == "Nov"
    return calendar.timegm((2026, 11, int(day), 0, 0, 0))


def test_points_land_where_the_axes_say():
    # 0.00 on Nov 1, 5.00 on Nov 15, 10.00 on Nov 29.
    data = [(NOV_1, 0), (NOV_1 + 14 * DAY, 5 * MICRO), (NOV_1 + 28 * DAY, 10 * MICRO)]
    root = parse(lineChart([("spent", data)], "Spending", "spent a day", currency="USD"))
    ys = ticks(root, "ytick")
    assert list(ys) == ["0.00", "2.00", "4.00", "6.00", "8.00", "10.00"]
    (x0, y0), (x1, y1), (x2, y2) = polyline(root)
    assert y0 == ys["0.00"] and y2 == ys["10.00"]
    assert y1 == pytest.approx((ys["0.00"] + ys["10.00"]) / 2, abs=0.1)
    assert x1 == pytest.approx((x0 + x2) / 2, abs=0.1)
    # Each day tick stands where its day falls between the first and last points.
    xs = ticks(root, "xtick")
    assert len(xs) >= 3
    for label, x in xs.items():
        t = dayLabel(label)
        assert x == pytest.approx(x0 + (t - NOV_1) / (28 * DAY) * (x2 - x0), abs=0.1), label
    # The axis says the currency; each point says its amount and day.
    assert "spent a day (USD)" in texts(root)
    tips = ["".join(c.find(SVG + "title").itertext()) for c in root.iter(SVG + "circle")]
    assert tips == ["spent: 0.00 USD at 2026-11-01 00:00 UTC",
                    "spent: 5.00 USD at 2026-11-15 00:00 UTC",
                    "spent: 10.00 USD at 2026-11-29 00:00 UTC"]


def test_two_series_share_the_scale_and_the_legend_names_both():
    spent = [(NOV_1 + d * DAY, 3 * MICRO) for d in range(7)]
    earned = [(NOV_1 + d * DAY, 6 * MICRO) for d in range(7)]
    root = parse(lineChart([("spent", spent), ("earned", earned)], "Money", "a day"))
    zero = ticks(root, "ytick")["0.00"]
    [ySpent] = {y for _, y in polyline(root, 0)}
    [yEarned] = {y for _, y in polyline(root, 1)}
    assert zero - yEarned == pytest.approx(2 * (zero - ySpent), abs=0.1)
    assert {"spent", "earned"} <= set(texts(root))


def test_hostile_labels_stay_text():
    svg = lineChart([(HOSTILE, [(NOV_1, MICRO), (NOV_1 + DAY, 2 * MICRO)])], HOSTILE, HOSTILE,
                    currency=HOSTILE)
    root = parse(svg)
    assert "<script" not in svg and "</svg><" not in svg[:-6]
    shown = texts(root)
    # The label reads as it was written (less what XML cannot carry), cut to its bound.
    readable = HOSTILE.replace("\x00", "\ufffd").replace("\x1b", "\ufffd")
    assert readable[:charts.MAX_LABEL - 1] + "\u2026" in shown
    assert all("\x00" not in t and "\x1b" not in t for t in shown)
    assert root.find(SVG + "title").text.startswith("</svg><script>")


def test_a_huge_label_is_cut_to_its_bound():
    root = parse(lineChart([("x" * 10**6, [(NOV_1, 1)])], "y " * 10**6, "z"))
    assert max(len(t) for t in texts(root)) <= charts.MAX_TITLE
    assert "x" * (charts.MAX_LABEL - 1) + "\u2026" in texts(root)


def test_hostile_price_chart_text_stays_text():
    svg = priceChart(MICRO, [MICRO, 2 * MICRO], title=HOSTILE, currency=HOSTILE, unit=HOSTILE)
    root = parse(svg)
    assert "<script" not in svg
    assert root.find(SVG + "title").text.startswith("</svg><script>")


def test_huge_and_negative_amounts_keep_their_places():
    data = [(NOV_1, MAX_AMOUNT), (NOV_1 + DAY, -MAX_AMOUNT), (NOV_1 + 2 * DAY, 0)]
    root = parse(lineChart([("refunds", data)], "Net", "a day"))
    ys = ticks(root, "ytick")
    zero = ys["0.00"]
    top, bottom = min(ys.values()), max(ys.values())
    (_, yHigh), (_, yLow), (_, yZero) = polyline(root)
    assert yZero == zero
    assert top <= yHigh < zero < yLow <= bottom
    assert zero - yHigh == pytest.approx(yLow - zero, abs=0.1)
    assert "1000000000.00" in ys and "-1000000000.00" in ys
    # The long labels fit between the axis title and the plot.
    for group in root.iter(SVG + "g"):
        if group.get("class") == "ytick":
            label = group.find(SVG + "text")
            assert float(label.get("x")) - len(label.text) * charts.CHAR_WIDTH >= 18


@pytest.mark.parametrize("points, problem", [
    ([(NOV_1, MAX_AMOUNT + 1)], "beyond any real amount"),
    ([(NOV_1, 1.5)], "not an amount"),
    ([(NOV_1, True)], "not an amount"),
    ([(NOV_1, "12")], "not an amount"),
    ([(float("nan"), 1)], "not a time"),
    ([(float("inf"), 1)], "not a time"),
    ([(-5, 1)], "not a time"),
    ([(NOV_1,)], "not a \\(time, amount\\) point"),
    ([None], "not a \\(time, amount\\) point"),
])
def test_data_a_chart_cannot_show_is_refused_naming_it(points, problem):
    with pytest.raises(ChartError, match=problem):
        lineChart([("a", points)], "t", "y")


def test_bad_sizes_and_too_many_series_are_refused():
    with pytest.raises(ChartError, match="width is a whole number of pixels"):
        lineChart([], "t", "y", width=10**6)
    with pytest.raises(ChartError, match="height is a whole number of pixels"):
        priceChart(None, [], height=0)
    with pytest.raises(ChartError, match="at most 8 series, not 9"):
        lineChart([(str(i), []) for i in range(9)], "t", "y")
    with pytest.raises(ChartError, match="below zero"):
        priceChart(None, [MICRO, -1])
    with pytest.raises(ChartError, match="your price"):
        priceChart(-1, [MICRO])


def test_ten_thousand_points_render_in_a_bounded_size_and_keep_their_peak():
    data = [(NOV_1 + 60 * i, (i * 7919) % 1000 * 1000) for i in range(10_000)]
    data[6_543] = (data[6_543][0], 50 * MICRO)         # one spike
    svg = lineChart([("per minute", data)], "Busy", "spent")
    root = parse(svg)
    points = polyline(root)
    assert len(points) <= 2 * 640
    assert len(svg) < 40_000
    # The spike is still drawn, at its height.
    assert min(y for _, y in points) == ticks(root, "ytick")["50.00"]
    # Thinned points keep time order.
    assert [x for x, _ in points] == sorted(x for x, _ in points)
    # Too many points for dots: none.
    assert root.find(f".//{SVG}circle") is None


def test_no_data_gives_a_chart_saying_so():
    for svg in (lineChart([], "Spending", "spent"),
                lineChart([("spent", [])], "Spending", "spent"),
                priceChart(None, []), priceChart(5 * MICRO, [])):
        root = parse(svg)
        assert charts.NO_DATA in texts(root)
        assert root.find(f".//{SVG}polyline") is None


def test_a_single_point_or_a_flat_zero_line_still_draws():
    root = parse(lineChart([("spent", [(NOV_1, 2 * MICRO)])], "One", "spent"))
    [dot] = root.iter(SVG + "circle")
    assert float(dot.get("cy")) == ticks(root, "ytick")["2.00"]
    root = parse(lineChart([("spent", [(NOV_1, 0), (NOV_1 + DAY, 0)])], "Zero", "spent"))
    assert {y for _, y in polyline(root)} == {ticks(root, "ytick")["0.00"]}


def bars(root):
    """[(count, x, width, height)] of a histogram's bars."""
    out = []
    for bar in root.iter(SVG + "rect"):
        if bar.get("class") == "bar":
            count = int(bar.find(SVG + "title").text.split()[0])
            out.append((count, float(bar.get("x")), float(bar.get("width")),
                        float(bar.get("height"))))
    return out


def test_the_price_chart_counts_prices_and_marks_mine_on_the_scale():
    prices = [100_000] * 3 + [200_000]                 # 0.10 x3, 0.20
    root = parse(priceChart(150_000, prices, currency="USD"))
    drawn = bars(root)
    assert sorted(count for count, *_ in drawn) == [1, 3]
    [(_, x1, _, h1)] = [b for b in drawn if b[0] == 1]
    [(_, x3, _, h3)] = [b for b in drawn if b[0] == 3]
    assert h3 == pytest.approx(3 * h1, abs=0.2) and x3 < x1
    ys = ticks(root, "ytick")
    assert ys["0"] - ys["3"] == pytest.approx(h3, abs=0.1)
    # The mark stands at 0.15 on the x axis's scale.
    xs = {int(round(float(label) * MICRO)): x for label, x in ticks(root, "xtick").items()}
    (a, xa), (b, xb) = sorted(xs.items())[:2]
    mark = next(g for g in root.iter(SVG + "g") if g.get("class") == "mark")
    xMark = float(mark.find(SVG + "line").get("x1"))
    assert xMark == pytest.approx(xa + (150_000 - a) / (b - a) * (xb - xa), abs=0.1)
    assert "your price 0.15 USD: 3 of 4 ask less" in texts(root)


def test_the_price_chart_of_ten_thousand_sellers_stays_small():
    prices = [(i * 7919) % 1_000_000 + 1 for i in range(10_000)]
    svg = priceChart(500_000, prices)
    root = parse(svg)
    assert sum(count for count, *_ in bars(root)) == 10_000
    assert len(bars(root)) <= 41
    assert len(svg) < 20_000


def test_one_price_alone_is_a_bar_not_the_whole_chart():
    root = parse(priceChart(None, [250_000]))
    [(count, x, width, _)] = bars(root)
    plot = ticks(root, "ytick")
    assert count == 1 and plot
    assert width < 640 / 3


@pytest.mark.parametrize("span, count, step", [
    (10, 5, 2), (7, 5, 2), (1, 5, 1), (0, 5, 1), (11, 5, 5), (99, 5, 20),
    (10**15, 5, 2 * 10**14), (3, 1, 5)])
def test_nice_steps(span, count, step):
    assert charts.niceStep(span, count) == step
    assert re.fullmatch(r"[125]0*", str(step))
