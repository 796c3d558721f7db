"""The screens and replicas an order or `cpushare sellers` is given on the command line."""

import argparse
import os
import shlex
import shutil

from cpushare.client.cli.connection import CommandError
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
    g.add_argument("--trusted", action="store_true",
                   help="only sellers whose TPM attestation passed, at their trusted prices:"
                        " each VM starts only after its seller's TPM quote matches the"
                        " market's policy, and stops when a later one does not")
    g.add_argument("--traffic", type=float, metavar="GB",
                   help="GB of network traffic a VM-hour is expected to carry (default 1):"
                        " sellers are ranked by price a core-hour + fee a GB x GB")


def addReplicaArguments(p, placing=False):
    """--replicas and --diverse; placing an order, also --replicas auto and --compare."""
    g = p.add_argument_group("replicas (each VM run on several different sellers)")
    if placing:
        g.add_argument("--replicas", type=replicaCount, metavar="K|auto",
                       help="run each VM K times (2 to 5), each on a different seller; or"
                            " auto: run a VM a second time only now and then, the more rarely"
                            " the more results in a row its seller had right")
    else:
        g.add_argument("--replicas", type=int, metavar="K",
                       help="run each VM K times (2 to 5), each on a different seller")
    g.add_argument("--diverse", metavar="WHAT,..",
                   help="what the sellers of one VM's replicas must differ in: any of"
                        " country, cpu, owner (default: all three)")
    if placing:
        g.add_argument("--compare", metavar="'CMD ARGS'",
                       help="when replicas' results differ, run CMD ARGS FILE_A FILE_B on this"
                            " computer (by your buyer program, never through a shell): exit"
                            " status 0 says they are the same")


def replicaCount(text):
    """An order's --replicas: a number, or auto."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of replicas nor auto")


def replicaArguments(args):
    """--replicas and --diverse as PlaceOrder/ListSellers arguments."""
    given = {}
    if args.replicas == "auto":
        given["adaptive"] = True
    elif args.replicas is not None:
        given["replicas"] = args.replicas
    if args.diverse is not None:
        given["diverse"] = [d.strip() for d in args.diverse.split(",") if d.strip()]
    return given


def comparatorWords(args):
    """
    --compare as the words of the command to run (None without it): split
    as a POSIX shell would, but never run by one; its program found now,
    on this computer, so that the buyer's program runs the same one.
    """
    if args.compare is None:
        return None
    if args.replicas is None:
        raise CommandError("--compare needs --replicas K or --replicas auto: it compares"
                           " the results of a VM's replicas")
    try:
        words = shlex.split(args.compare)
    except ValueError as e:
        raise CommandError(f"--compare {args.compare!r} cannot be split into words: {e}")
    if not words:
        raise CommandError("--compare: the command is empty")
    program = words[0]
    found = program if os.sep in program else shutil.which(program)
    if found is None or not os.path.isfile(found) or not os.access(found, os.X_OK):
        raise CommandError(f"--compare: {program!r} is not a program on this computer")
    return [os.path.abspath(found)] + words[1:]


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
    if getattr(args, "trusted", False):
        screens["trusted"] = True
    return screens
