"""
Charts drawn on the server as SVG: pure functions from data to the text of
an C{<svg>} element, with no script, no style sheet and no reference to
anything outside it, so a page can put it inline (or serve it as
image/svg+xml) under a Content-Security-Policy that allows no inline
script or style.

L{lineChart} draws amounts over time (a buyer's spending, a seller's
earnings a day); L{priceChart} draws the prices of the sellers online as
a histogram with one price (the seller's own) marked.  Amounts are integer
micro-units, shown with L{cpushare.money.formatAmount}.

Every text that comes from data (titles, series labels) is XML-escaped,
stripped of the characters XML cannot carry and cut to a bounded length;
a line with more points than the chart has pixels is thinned to the lowest
and highest point of each pixel column, so the size of a chart depends on
its width, not on its data.  Data a chart cannot show (an amount that is
not an integer of micro-units or beyond any real amount, a time that is
not one) raises L{ChartError} naming it.

Elements carry classes (C{chart}, C{xtick}, C{ytick}, C{series}, C{mark},
C{empty}) for the site's style sheet; colours and fonts are presentation
attributes, which a Content-Security-Policy does not count as inline style.
"""

import datetime
import math
import re

from cpushare.money import MAX_AMOUNT, MICRO, formatAmount

# Sizes a chart may be drawn at (pixels).
MIN_WIDTH, MAX_WIDTH = 200, 4000
MIN_HEIGHT, MAX_HEIGHT = 120, 2000
# Series one line chart shows at most, and characters of a series label or
# a title kept (longer ones are cut and end with an ellipsis).
MAX_SERIES = 8
MAX_LABEL = 60
MAX_TITLE = 120
# A series shows a dot (with a tooltip) on each point when it has at most
# this many points left after thinning.
MAX_DOTS = 62
# A price histogram has at least this many bins.
MIN_BINS = 5
# Times a chart accepts: unix seconds from 1970 to 2200.
MAX_TIME = 7_258_118_400

NO_DATA = "no data yet"
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd",
           "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
MARK_COLOUR = "#d62728"
BAR_COLOUR = "#8fb8de"
TEXT_COLOUR = "#222222"
GRID_COLOUR = "#dddddd"
AXIS_COLOUR = "#555555"
FONT_SIZE = 11
# About how wide a character of the chart's font is, to make room for labels.
CHAR_WIDTH = 6.6

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
          "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
MINUTE, HOUR, DAY = 60, 3600, 86400
TIME_STEPS = (MINUTE, 5 * MINUTE, 15 * MINUTE, 30 * MINUTE, HOUR, 3 * HOUR, 6 * HOUR,
              12 * HOUR, DAY, 2 * DAY, 7 * DAY, 14 * DAY, 28 * DAY, 91 * DAY, 182 * DAY,
              364 * DAY, 728 * DAY, 1820 * DAY, 3640 * DAY, 18200 * DAY)

# XML 1.0 cannot carry these characters at all, even escaped.
_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


class ChartError(ValueError):
    """Data a chart cannot show; the message names it."""


# -- text


def _clean(text, limit):
    """C{text} as a string XML can carry, at most C{limit} characters."""
    # Cut first: a megabyte of label costs no more than a line of it.
    text = _NOT_XML.sub("\ufffd", str(text)[:limit * 8])
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit - 1] + "\u2026"
    return text


def _escape(text):
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#39;"))


def _num(value):
    """A coordinate: one decimal, no trailing zeros."""
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _element(name, text=None, **attributes):
    """An element with C{attributes} (C{class_} for class) and escaped C{text}."""
    parts = [name]
    for key, value in attributes.items():
        if isinstance(value, float):
            value = _num(value)
        parts.append(f'{key.rstrip("_").replace("_", "-")}="{_escape(str(value))}"')
    if text is None:
        return f"<{' '.join(parts)}/>"
    return f"<{' '.join(parts)}>{_escape(text)}</{name}>"


def _text(x, y, text, anchor="middle", **attributes):
    return _element("text", text, x=float(x), y=float(y), text_anchor=anchor,
                    fill=TEXT_COLOUR, **attributes)


def _textWidth(text):
    return len(text) * CHAR_WIDTH


# -- scales and ticks


def niceStep(span, count):
    """
    The step (a positive integer) of about C{count} ticks over C{span}: 1,
    2 or 5 times a power of ten, at least 1.
    """
    raw = max(1, -(-int(span) // max(1, count)))
    magnitude = 10 ** (len(str(raw)) - 1)
    for multiple in (1, 2, 5, 10):
        if multiple * magnitude >= raw:
            return multiple * magnitude
    raise AssertionError("unreachable")


def _niceTicks(low, high, count):
    """Integer ticks on a nice step covering [low, high]: (first, last, step)."""
    step = niceStep(high - low, count)
    return (low // step) * step, -(-high // step) * step, step


def _amountLabels(values, step):
    """Each amount with formatAmount, all with as many decimals as C{step} needs."""
    decimals = 2
    while decimals < 6 and step % (MICRO // 10 ** decimals):
        decimals += 1
    labels = []
    for value in values:
        text = formatAmount(value)
        labels.append(text + "0" * (decimals - len(text.split(".")[1])))
    return labels


class _Scale:
    """A linear map from [low, high] of data to [start, end] of pixels."""

    def __init__(self, low, high, start, end):
        self.low, self.high, self.start, self.end = low, high, start, end

    def __call__(self, value):
        return self.start + (value - self.low) * (self.end - self.start) / (self.high - self.low)


def _timeLabel(t, step, span):
    moment = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    day = f"{MONTHS[moment.month - 1]} {moment.day}"
    if step >= 182 * DAY or span > 2 * 364 * DAY:
        return f"{moment.year}-{moment.month:02d}-{moment.day:02d}"
    if step >= DAY:
        return day
    clock = f"{moment.hour:02d}:{moment.minute:02d}"
    return clock if span <= DAY else f"{day} {clock}"


def _timeTicks(low, high, count):
    """Times on a round step (UTC) inside [low, high]: ([t...], step)."""
    span = high - low
    step = next((s for s in TIME_STEPS if span / s <= count), TIME_STEPS[-1])
    first = math.ceil(low / step) * step
    return list(range(int(first), int(high) + 1, step)), step


def _timeText(t):
    moment = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M UTC")


# -- the frame every chart shares


def _checkSize(width, height):
    for name, value, low, high in (("width", width, MIN_WIDTH, MAX_WIDTH),
                                   ("height", height, MIN_HEIGHT, MAX_HEIGHT)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ChartError(f"a chart's {name} is a whole number of pixels from {low}"
                             f" to {high}, not {value!r}")


def _svg(kind, title, width, height, body):
    """The C{<svg>} element around C{body} (a list of element texts)."""
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
            f' viewBox="0 0 {width} {height}" role="img" class="chart chart-{kind}"'
            f' font-family="sans-serif" font-size="{FONT_SIZE}">')
    parts = [head, _element("title", title),
             _element("rect", x=0, y=0, width=width, height=height, fill="#ffffff"),
             _text(width / 2, 16, title, font_weight="bold", class_="chart-title")]
    return "".join(parts + body + ["</svg>"])


def _empty(kind, title, width, height):
    return _svg(kind, title, width, height, [
        _text(width / 2, height / 2, NO_DATA, class_="empty", fill_opacity="0.7")])


def _amount(value, where):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ChartError(f"{where}: {value!r} is not an amount (an integer of micro-units)")
    if abs(value) > MAX_AMOUNT:
        raise ChartError(f"{where}: {value} micro-units is beyond any real amount")
    return value


def _time(value, where):
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not 0 <= value <= MAX_TIME):  # NaN fails this comparison too
        raise ChartError(f"{where}: {value!r} is not a time (unix seconds from 1970 to 2200)")
    return value


def _yAxis(low, high, step, top, bottom, left, right):
    """The horizontal grid with amount labels: (elements, scale)."""
    y = _Scale(low, high, bottom, top)
    values = list(range(low, high + 1, step))
    out = []
    for value, label in zip(values, _amountLabels(values, step)):
        colour = AXIS_COLOUR if value == 0 else GRID_COLOUR
        out.append('<g class="ytick">' + _element(
            "line", x1=float(left), x2=float(right), y1=y(value), y2=y(value), stroke=colour)
            + _text(left - 6, y(value) + 4, label, anchor="end") + "</g>")
    return out, y


def _yTitle(text, x, top, bottom):
    middle = (top + bottom) / 2
    return _text(x, middle, text, transform=f"rotate(-90 {_num(x)} {_num(middle)})",
                 class_="axis-title")


def _leftMargin(labels):
    return 24 + max(_textWidth(label) for label in labels) + 8


# -- the line chart


def _thin(points, x, columns):
    """
    C{points} (sorted by time) cut to the lowest and highest of each pixel
    column, in time order: at most two a column.
    """
    if len(points) <= 2 * columns:
        return points
    kept, column, low, high = [], None, None, None
    for point in points:
        c = int(x(point[0]))
        if c != column:
            if column is not None:
                kept.extend(_inTimeOrder(low, high))
            column, low, high = c, point, point
        elif point[1] < low[1]:
            low = point
        elif point[1] > high[1]:
            high = point
    kept.extend(_inTimeOrder(low, high))
    return kept


def _inTimeOrder(low, high):
    if low is high:
        return [low]
    return [low, high] if low[0] <= high[0] else [high, low]


def lineChart(series, title, yLabel, width=640, height=240, currency=""):
    """
    An SVG line chart of amounts over time.

    @param series: [(label, [(unix time, micro-units), ...]), ...], at most
        L{MAX_SERIES}; each line is drawn in time order.
    @param title: the chart's title (shown, and its accessible name).
    @param yLabel: what the amounts are ("spent a day"); the currency is
        added to it when given.
    @param currency: the market's currency ("USD"), or "".
    @return: the text of an C{<svg>} element; one saying "no data yet"
        when no series has a point.
    """
    _checkSize(width, height)
    title = _clean(title, MAX_TITLE)
    currency = _clean(currency, MAX_LABEL)
    yTitle = _clean(f"{yLabel} ({currency})" if currency else yLabel, MAX_TITLE)
    series = list(series)
    if len(series) > MAX_SERIES:
        raise ChartError(f"a chart shows at most {MAX_SERIES} series, not {len(series)}")
    lines = []
    for index, entry in enumerate(series):
        try:
            label, points = entry
        except (TypeError, ValueError):
            raise ChartError(f"series {index} is not a (label, points) pair") from None
        label = _clean(label, MAX_LABEL)
        where = f"series {label!r}"
        checked = []
        for point in points:
            try:
                t, amount = point
            except (TypeError, ValueError):
                raise ChartError(f"{where}: {point!r} is not a (time, amount) point") from None
            checked.append((_time(t, where), _amount(amount, where)))
        checked.sort(key=lambda p: p[0])
        lines.append((label, checked))
    drawn = [points for _, points in lines if points]
    if not drawn:
        return _empty("line", title, width, height)

    times = [t for points in drawn for t in (points[0][0], points[-1][0])]
    amounts = [a for points in drawn for _, a in points]
    tLow, tHigh = min(times), max(times)
    if tLow == tHigh:
        tLow, tHigh = tLow - DAY / 2, tHigh + DAY / 2
    aLow, aHigh = min(0, min(amounts)), max(0, max(amounts))
    if aLow == aHigh:
        aHigh = MICRO
    aLow, aHigh, aStep = _niceTicks(aLow, aHigh, max(2, (height - 90) // 30))

    legendRows = _legendRows([label for label, _ in lines], width - 20)
    top, bottom = 30, height - 28 - 16 * len(legendRows)
    if bottom - top < 40:
        raise ChartError(f"a chart {height} pixels high has no room for {len(lines)} series")
    left = _leftMargin(_amountLabels([aLow, aHigh], aStep))
    right = width - 16
    grid, y = _yAxis(aLow, aHigh, aStep, top, bottom, left, right)
    x = _Scale(tLow, tHigh, left, right)

    body = grid + [_yTitle(yTitle, 12, top, bottom)]
    ticks, step = _timeTicks(tLow, tHigh, max(2, int((right - left) // 90)))
    for t in ticks:
        body.append('<g class="xtick">' + _element(
            "line", x1=x(t), x2=x(t), y1=float(bottom), y2=float(bottom + 4),
            stroke=AXIS_COLOUR) + _text(x(t), bottom + 16, _timeLabel(t, step, tHigh - tLow))
            + "</g>")
    columns = max(1, int(right - left))
    for index, (label, points) in enumerate(lines):
        colour = COLOURS[index]
        if not points:
            continue
        points = _thin(points, x, columns)
        parts = [f'<g class="series" data-series="{index}">', _element("title", label)]
        if len(points) > 1:
            parts.append(_element(
                "polyline", fill="none", stroke=colour, stroke_width=2,
                stroke_linejoin="round",
                points=" ".join(f"{_num(x(t))},{_num(y(a))}" for t, a in points)))
        if len(points) <= MAX_DOTS:
            for t, a in points:
                parts.append(
                    f'<circle cx="{_num(x(t))}" cy="{_num(y(a))}" r="3" fill="{colour}">'
                    + _element("title", f"{label}: {formatAmount(a)}"
                               f"{' ' + currency if currency else ''} at {_timeText(t)}")
                    + "</circle>")
        parts.append("</g>")
        body.append("".join(parts))
    body.extend(_legend(legendRows, bottom + 34))
    return _svg("line", title, width, height, body)


def _legendRows(labels, room):
    """The series' (index, label) in rows that fit C{room} pixels."""
    rows, row, used = [], [], 0
    for index, label in enumerate(labels):
        need = 18 + _textWidth(label) + 16
        if row and used + need > room:
            rows.append(row)
            row, used = [], 0
        row.append((index, label))
        used += need
    if row:
        rows.append(row)
    return rows


def _legend(rows, top):
    out = []
    for number, row in enumerate(rows):
        y = top + 16 * number
        x = 20.0
        for index, label in row:
            out.append('<g class="legend">' + _element(
                "rect", x=x, y=float(y - 9), width=12, height=10, fill=COLOURS[index])
                + _text(x + 18, y, label, anchor="start") + "</g>")
            x += 18 + _textWidth(label) + 16
    return out


# -- the price histogram


def priceChart(myPrice, prices, title="Prices of the sellers online", width=640,
               height=240, currency="", unit="a core-hour"):
    """
    An SVG histogram of C{prices} (micro-units, one a seller online) with
    C{myPrice} marked (None: nothing marked), and how many sellers ask
    less.  Says "no data yet" when there are no prices.
    """
    _checkSize(width, height)
    title = _clean(title, MAX_TITLE)
    unit = _clean(unit, MAX_LABEL)
    currency = _clean(currency, MAX_LABEL)
    prices = [_amount(p, "prices") for p in prices]
    if any(p < 0 for p in prices):
        raise ChartError(f"prices: {min(prices)} is below zero")
    if myPrice is not None:
        _amount(myPrice, "your price")
        if myPrice < 0:
            raise ChartError(f"your price: {myPrice} is below zero")
    if not prices:
        return _empty("price", title, width, height)

    shown = prices + ([myPrice] if myPrice is not None else [])
    low, high = min(shown), max(shown)
    top, bottom = 46, height - 44
    right = width - 16
    bins = max(4, min(40, (width - 120) // 24))
    binStep = niceStep(max(high - low, high // 10, 1), bins)
    first = (low // binStep) * binStep
    count = (high - first) // binStep + 1
    if count < MIN_BINS:
        # A few prices close together: a bar or two in the middle of a
        # range, not one bar as wide as the chart.
        first = max(0, first - (MIN_BINS - count) // 2 * binStep)
        count = MIN_BINS
    counts = [0] * count
    for price in prices:
        counts[(price - first) // binStep] += 1
    last = first + count * binStep

    peak = max(counts)
    cStep = niceStep(peak, max(2, (bottom - top) // 30))
    cHigh = -(-peak // cStep) * cStep
    left = 24 + _textWidth(str(cHigh)) + 8
    y = _Scale(0, cHigh, bottom, top)
    x = _Scale(first, last, left, right)
    body = [_yTitle(f"sellers online ({len(prices)})", 12, top, bottom)]
    for value in range(0, cHigh + 1, cStep):
        body.append('<g class="ytick">' + _element(
            "line", x1=float(left), x2=float(right), y1=y(value), y2=y(value),
            stroke=AXIS_COLOUR if value == 0 else GRID_COLOUR)
            + _text(left - 6, y(value) + 4, str(value), anchor="end") + "</g>")
    for index, n in enumerate(counts):
        if not n:
            continue
        start = first + index * binStep
        lowText, highText = _amountLabels([start, start + binStep], binStep)
        body.append(
            f'<rect class="bar" x="{_num(x(start) + 1)}" y="{_num(y(n))}"'
            f' width="{_num(max(1.0, x(start + binStep) - x(start) - 2))}"'
            f' height="{_num(y(0) - y(n))}" fill="{BAR_COLOUR}">'
            + _element("title", f"{n} seller{'s' if n != 1 else ''} asking from {lowText}"
                       f" to less than {highText}{' ' + currency if currency else ''}")
            + "</rect>")
    room = _textWidth(_amountLabels([last], binStep)[0]) + 24
    tickStep = niceStep(last - first, max(2, int((right - left) // room)))
    ticks = list(range(-(-first // tickStep) * tickStep, last + 1, tickStep))
    for value, label in zip(ticks, _amountLabels(ticks, tickStep)):
        body.append('<g class="xtick">' + _element(
            "line", x1=x(value), x2=x(value), y1=float(bottom), y2=float(bottom + 4),
            stroke=AXIS_COLOUR) + _text(x(value), bottom + 16, label) + "</g>")
    what = f"price {unit}" + (f" ({currency})" if currency else "")
    body.append(_text((left + right) / 2, bottom + 32, what, class_="axis-title"))
    if myPrice is not None:
        cheaper = sum(1 for p in prices if p < myPrice)
        mine = x(myPrice)
        label = (f"your price {formatAmount(myPrice)}{' ' + currency if currency else ''}:"
                 f" {cheaper} of {len(prices)} ask less")
        anchor = "start" if mine < (left + right) / 2 else "end"
        body.append('<g class="mark">' + _element(
            "line", x1=mine, x2=mine, y1=float(top - 6), y2=float(bottom),
            stroke=MARK_COLOUR, stroke_width=2)
            + _text(mine + (4 if anchor == "start" else -4), top - 10, label, anchor=anchor)
            + "</g>")
    return _svg("price", title, width, height, body)
