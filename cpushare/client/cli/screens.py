"""The screens an order or `cpushare sellers` is given on the command line."""

from cpushare.client.cli.output import amount


def addScreenArguments(p):
    g = p.add_argument_group("screens (which sellers may run the VMs)")
    g.add_argument("--max-price", metavar="P", help="at most P a core-hour")
    g.add_argument("--max-net-fee", metavar="F", help="at most F a GB of network traffic")
    g.add_argument("--min-rating", type=float, metavar="R", help="rated at least R (0 to 1)")
    g.add_argument("--min-validated", type=int, metavar="N",
                   help="at least N results accepted by the market's checks"
                        " (replicated runs and canaries)")
    g.add_argument("--max-latency", type=float, metavar="MS",
                   help="at most MS milliseconds round trip to the market")
    g.add_argument("--min-bandwidth", type=float, metavar="MBPS",
                   help="at least MBPS megabits a second, as the market measured")
    g.add_argument("--min-cpu", type=float, metavar="SCORE",
                   help="at least SCORE on the CPU benchmark")
    g.add_argument("--country", metavar="CC,..", help="only sellers in these countries")
    g.add_argument("--not-country", metavar="CC,..", help="no sellers in these countries")
    g.add_argument("--traffic", type=float, metavar="GB",
                   help="GB of network traffic a VM-hour is expected to carry (default 1):"
                        " sellers are ranked by price a core-hour + fee a GB x GB")


def addReplicaArguments(p):
    g = p.add_argument_group("replicas (each VM run on several different sellers)")
    g.add_argument("--replicas", type=int, metavar="K",
                   help="run each VM K times (2 to 5), each on a different seller")
    g.add_argument("--diverse", metavar="WHAT,..",
                   help="what the sellers of one VM's replicas must differ in: any of"
                        " country, cpu, owner (default: all three)")


def replicaArguments(args):
    """--replicas and --diverse as PlaceOrder/ListSellers arguments."""
    given = {}
    if args.replicas is not None:
        given["replicas"] = args.replicas
    if args.diverse is not None:
        given["diverse"] = [d.strip() for d in args.diverse.split(",") if d.strip()]
    return given


def screenArguments(args):
    """The screens given on the command line as PlaceOrder/ListSellers arguments."""
    screens = {}
    if args.max_price is not None:
        screens["max_price"] = amount(args.max_price, "--max-price")
    if args.max_net_fee is not None:
        screens["max_net_fee"] = amount(args.max_net_fee, "--max-net-fee", allowZero=True)
    for name in ("min_rating", "max_latency", "min_bandwidth", "min_cpu", "traffic",
                 "min_validated"):
        if getattr(args, name) is not None:
            screens[name] = getattr(args, name)
    for name, key in (("country", "countries"), ("not_country", "not_countries")):
        value = getattr(args, name)
        if value is not None:
            screens[key] = [c.strip() for c in value.split(",") if c.strip()]
    return screens
