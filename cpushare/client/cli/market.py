"""
The market's commands: screening sellers, terms, leases, ratings.

    cpushare sellers [SCREENS] [--replicas K [--diverse country,cpu,owner]] [--explain] [--json]
    cpushare terms [--price P] [--net-fee F] [--country CC] [--trusted-price P]
    cpushare leases [--json]
    cpushare rate LEASE good|bad [--comment TEXT]

SCREENS, shared with `cpushare order place`:

    --max-price P       at most P a core-hour
    --max-net-fee F     at most F a GB of network traffic
    --min-rating R      rated at least R (0 to 1)
    --min-validated N   at least N results accepted by the market's checks
    --max-latency MS    at most MS round trip to the market
    --min-bandwidth MBPS
    --min-cpu SCORE
    --country CC,..     only in these countries
    --not-country CC,..
    --trusted           only sellers whose TPM attestation passed, at their
                        trusted prices
    --traffic GB        not a screen: the GB of network traffic a VM-hour is
                        expected to carry (default 1), to rank sellers by what
                        a VM-hour really costs (price + fee x GB)
"""

from cpushare.client.cli.connection import Connection
from cpushare.client.cli.output import (
    amount, command, duration, formatTable, printedAsJSON, printListing)
from cpushare.client.cli.screens import (
    addReplicaArguments, addScreenArguments, replicaArguments, screenArguments)
from cpushare.protocol import commands
from cpushare.money import formatAmount


def validationColumns(seller):
    """The VALIDATED and ERRORS cells of a seller: its checked results."""
    rate = seller.get("error_rate")
    return (str(seller.get("validated", 0)),
            "-" if rate is None else f"{100 * rate:.1f}%")


def enrolled(seller):
    """Whether a seller of ListSellers has a TPM enrolled (attested or not)."""
    return seller.get("attested") is not None or \
        not (seller.get("trust") or "has no TPM").startswith("has no TPM")


def trustedColumns(seller, now):
    """The TRUSTED and TRUSTED/CORE-H cells: when its TPM last attested, its trusted price."""
    if not enrolled(seller):
        return ("-", "-")
    price = formatAmount(seller["trusted_price"]) if seller.get("trusted_price") else "-"
    if seller.get("trust"):
        return ("failed", price)
    return (f"{duration(now - seller['attested'])} ago", price)


def formatSellers(sellers, now):
    # The trusted columns only when a seller listed has a TPM enrolled.
    trusted = any(enrolled(s) for s in sellers)
    rows = [("NAME", "PRICE/CORE-H", "NET/GB", "FREE/CORES", "FREE/MEMORY", "RATING",
             "VALIDATED", "ERRORS", "LATENCY", "MBPS", "CPU", "COUNTRY", "ONLINE",
             "CPU-MODEL") + (("TRUSTED", "TRUSTED/CORE-H") if trusted else ())]
    excluded = []
    for s in sellers:
        if s.get("excluded"):
            excluded.append(s)
            continue
        latency, bandwidth, cpu = s.get("latency_ms"), s.get("bandwidth_mbps"), s.get("cpu_score")
        rows.append((
            s["name"], formatAmount(s["price"]), formatAmount(s["net_fee"]),
            f"{s['free_cores']}/{s['cores']}", f"{s['free_memory']}/{s['memory']}MB",
            f"{s['rating']:.2f}/{s['votes']}" if s["votes"] else "new",
            *validationColumns(s),
            "-" if latency is None else f"{latency:.1f} ms",
            "-" if bandwidth is None else f"{bandwidth:.0f}",
            "-" if cpu is None else f"{cpu:.0f}",
            s.get("country") or "-", duration(now - s["connected"]), s.get("cpu") or "-",
            *(trustedColumns(s, now) if trusted else ()),
        ))
    lines = [formatTable(rows)] if len(rows) > 1 else ["no seller online passes these screens"]
    if excluded:
        lines.append("")
        lines.append("excluded:")
        for s in excluded:
            lines.append(f"  {s['name']} {s['excluded']}")
    return "\n".join(lines)


async def sellers(reactor, args, home):
    screens = screenArguments(args)
    screens.update(replicaArguments(args))
    found = []
    async with Connection(reactor, home) as market:
        while True:
            page = await market.call(commands.ListSellers, offset=len(found),
                                     explain=args.explain, **screens)
            found.extend(page["sellers"])
            if not page["sellers"] or len(found) >= page["total"]:
                break
    for s in found:     # in the JSON too before any result was checked
        s.setdefault("validated", 0)
        s.setdefault("error_rate", None)
    printListing(args.json, found, "no sellers are online", formatSellers)
    if page.get("replicas") and not args.json:
        print(f"replicas: {page['replicas']}")


async def terms(reactor, args, home):
    given = {}
    if args.price is not None:
        given["price"] = amount(args.price, "--price")
    if args.net_fee is not None:
        given["net_fee"] = amount(args.net_fee, "--net-fee", allowZero=True)
    if args.country is not None:
        given["country"] = args.country
    if args.trusted_price is not None:
        given["trusted_price"] = amount(args.trusted_price, "--trusted-price")
    async with Connection(reactor, home) as market:
        if given:
            result = await market.call(commands.SetTerms, **given)
        else:
            result = await market.call(commands.SetTerms)
    if printedAsJSON(args, result):
        return
    print(f"price:   {formatAmount(result['price'])} a core-hour")
    print(f"net fee: {formatAmount(result['net_fee'])} a GB")
    print(f"country: {result.get('country') or 'not stated'}")


def formatLeases(leases, now):
    rows = [("LEASE", "VM", "ORDER", "SELLER", "PRICE/CORE-H", "NET/GB", "CORES", "TIME", "CPU",
             "CPU-COST", "TRAFFIC", "NET-COST", "CHARGED", "HELD", "RATED", "END")]
    for lease in leases:
        ended = lease.get("ended")
        rows.append((
            str(lease["lease"]), str(lease["vm"]), str(lease["order"]), lease["seller"],
            formatAmount(lease["price"]), formatAmount(lease["net_fee"]), str(lease["cores"]),
            duration((ended or now) - lease["started"]), f"{lease['cpu_seconds']:.1f}s",
            formatAmount(lease["cpu_cost"]), f"{lease['net_bytes'] / 1e6:.1f}MB",
            formatAmount(lease["net_cost"]), formatAmount(lease["charged"]),
            formatAmount(lease["held"]),
            lease.get("rating") or "-", lease.get("reason") or ("running" if not ended else ""),
        ))
    return formatTable(rows)


async def leases(reactor, args, home):
    async with Connection(reactor, home) as market:
        found = await market.every(commands.ListLeases, "leases", "lease", "before")
    printListing(args.json, found, "no leases yet: place an order with 'cpushare order place'",
                 formatLeases)


async def rate(reactor, args, home):
    kw = {"comment": args.comment} if args.comment is not None else {}
    async with Connection(reactor, home) as market:
        result = await market.call(commands.Rate, lease=args.lease,
                                   good=args.verdict == "good", **kw)
    print(f"rated lease {args.lease} {args.verdict}; {result['seller']} is now rated"
          f" {result['rating']:.2f} from {result['votes']} votes")


def addParsers(sub):
    s = command(
        sub, "sellers", sellers, json=True,
        help="the sellers an order with these screens would use",
        description="List the sellers online that pass the screens, in the order an order "
        "with the same screens would use them: the cheapest first, then the best rated, "
        "then the nearest.")
    addScreenArguments(s)
    addReplicaArguments(s)
    s.add_argument("--explain", action="store_true",
                   help="also list the sellers the screens exclude, and why")

    t = command(
        sub, "terms", terms, json=True, help="show or change what your seller asks",
        description="Show the terms your account sells at, or change them; a running "
        "seller program uses the new terms at once.")
    t.add_argument("--price", metavar="P", help="asking price a core-hour")
    t.add_argument("--net-fee", metavar="F", help="fee a GB of network traffic (0 for none)")
    t.add_argument("--country", metavar="CC", help="the country the seller runs in")
    t.add_argument("--trusted-price", metavar="P",
                   help="asking price a core-hour of trusted leases (a seller with --tpm)")

    command(sub, "leases", leases, json=True, help="your VMs' leases and what they cost")

    r = command(sub, "rate", rate, help="rate the seller of one of your leases, once")
    r.add_argument("lease", type=int)
    r.add_argument("verdict", choices=("good", "bad"))
    r.add_argument("--comment")
