"""
Replicated runs: an order's VMs each run K times, a replica group, on K
sellers that differ as the order asks (C{--diverse}):

- C{country}: the country of the seller's terms; a seller that does not
  state one cannot prove it differs, so it takes no such replica.
- C{cpu}: the CPU's vendor, family and model as the seller's client reads
  them (C{/proc/cpuinfo}) and reports in its Offer, and, when the market
  has measured both sellers with its own CPU benchmark, the benchmark
  band (the score in bands of CPU_BAND_WIDTH).  A seller can lie about its
  CPU; it cannot lie its score up, only down (by throttling).  A seller
  that does not say its CPU takes no such replica.
- C{owner}: different networks as the market sees the sellers'
  connections (one IPv4 /24 or IPv6 /48 is one network).

Two replicas of a group never run on one account, whatever the order
asks: K replicas are K different sellers.
"""

import ipaddress

import attr

from cpushare.protocol.commands import BadRequest

# The most replicas of one VM an order may ask for.
MAX_REPLICAS = 5
# What replicas may be asked to differ in; all of them by default.
DIVERSITY = ("country", "cpu", "owner")
# The width of a CPU benchmark band (the score is MB hashed a second).
CPU_BAND_WIDTH = 50.0
# Sellers whose addresses share these many leading bits are one network.
IPV4_PREFIX = 24
IPV6_PREFIX = 48
# The longest a seller's CPU vendor, family or model may be (characters).
MAX_CPU_TEXT = 64


def checkReplicas(replicas=None, diverse=None):
    """
    (K, diversity) from PlaceOrder's or ListSellers' arguments, checked:
    (1, frozenset()) for an order without replicas; BadRequest names a
    bad one.
    """
    if replicas is None:
        if diverse is not None:
            raise BadRequest("--diverse needs --replicas")
        return 1, frozenset()
    if replicas > MAX_REPLICAS:
        raise BadRequest(f"--replicas is 2 to {MAX_REPLICAS}, not {replicas}:"
                         f" an order runs each VM at most {MAX_REPLICAS} (MAX_REPLICAS) times")
    if replicas < 2:
        raise BadRequest(f"--replicas is 2 to {MAX_REPLICAS}, not {replicas}")
    if diverse is None:
        return replicas, frozenset(DIVERSITY)
    for name in diverse:
        if name not in DIVERSITY:
            raise BadRequest(f"--diverse {name!r} is not one of {', '.join(DIVERSITY)}")
    return replicas, frozenset(diverse)


def cpuIdentity(vendor=None, family=None, model=None):
    """A seller's CPU as its Offer says it: (vendor, family, model), or None when it does not."""
    given = (vendor, family, model)
    if None in given:
        return None
    for what, text in zip(("cpu_vendor", "cpu_family", "cpu_model"), given):
        if not text.isprintable() or len(text) > MAX_CPU_TEXT:
            raise BadRequest(f"{what}: printable text of at most {MAX_CPU_TEXT} characters")
    given = tuple(t.strip() for t in given)
    return given if all(given) else None


def network(host):
    """The network of an address as owner diversity counts it ("192.0.2.0/24"), or None."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = IPV4_PREFIX if address.version == 4 else IPV6_PREFIX
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def cpuBand(score):
    """The CPU benchmark band of a score (None: not measured)."""
    if score is None:
        return None
    return int(score // CPU_BAND_WIDTH)


@attr.s(frozen=True)
class Mark:
    """What diversity compares of the seller a replica runs on."""

    account = attr.ib()
    network = attr.ib(default=None)
    country = attr.ib(default=None)
    cpu = attr.ib(default=None)         # (vendor, family, model) or None
    band = attr.ib(default=None)        # cpuBand of the market's score, or None

    def evolve(self, **changes):
        return attr.evolve(self, **changes)


def markOf(session, figures):
    """
    The L{Mark} of the seller of C{session}, whose figures are C{figures};
    its network is the one L{Market.offer} noted, else worked out now.  Kept
    on the session while its figures stay the same object (the board's
    ranking makes them anew when anything changes).
    """
    kept = getattr(session, "replicaMark", None)
    if kept is not None and kept[0] is figures:
        return kept[1]
    net = getattr(session, "network", None) or network(session.peerHost())
    mark = Mark(account=session.account.id, network=net,
                country=figures.country, cpu=figures.cpu, band=cpuBand(figures.cpuScore))
    session.replicaMark = (figures, mark)
    return mark


def _describeCPU(cpu):
    return "/".join(cpu)


def conflict(diversity, mark, others, needBand=False):
    """
    Why a seller (C{mark}) may not run a replica of a group whose other
    replicas run on C{others} (marks) under C{diversity}, or None.  With
    C{needBand} (the market runs its CPU benchmark) a seller without a
    score yet takes no CPU-diverse replica.  A mark of a replica placed
    before a restart may know only its account: what it does not know is
    not compared.
    """
    if "country" in diversity and mark.country is None:
        return "does not state its country (--diverse country)"
    if "cpu" in diversity and mark.cpu is None:
        return "does not say its CPU (--diverse cpu)"
    if "cpu" in diversity and needBand and mark.band is None:
        return "has no CPU benchmark score yet (--diverse cpu)"
    if "owner" in diversity and mark.network is None:
        return "connects from an address the market cannot place in a network (--diverse owner)"
    for other in others:
        if other.account == mark.account:
            return "already runs a replica of this group"
        if "owner" in diversity and other.network == mark.network:
            return (f"connects from network {mark.network}, like the seller of another"
                    f" replica (--diverse owner)")
        if "country" in diversity and other.country == mark.country:
            return f"is in {mark.country}, like another replica (--diverse country)"
        if "cpu" in diversity:
            if other.cpu == mark.cpu:
                return (f"has the CPU {_describeCPU(mark.cpu)}, like another replica"
                        " (--diverse cpu)")
            if mark.band is not None and other.band == mark.band:
                low = mark.band * CPU_BAND_WIDTH
                return (f"is in the same CPU benchmark band ({low:.0f} to"
                        f" {low + CPU_BAND_WIDTH:.0f}) as another replica (--diverse cpu)")
    return None


def greedy(diversity, placed, candidates, needBand=False, enough=None):
    """
    How many replicas C{placed} and C{candidates} (marks, best first) give,
    taken in turn as placement takes them; it stops counting at C{enough}.
    """
    chosen = list(placed)
    for mark in candidates:
        if enough is not None and len(chosen) >= enough:
            break
        if conflict(diversity, mark, chosen, needBand) is None:
            chosen.append(mark)
    return len(chosen)


def _distinct(marks, *keys):
    """The fewest distinct known values among C{marks} of any of C{keys}."""
    return min(len({key(m) for m in marks} - {None}) for key in keys)


# Each condition, as a waiting reason names it when it is short, and the
# values that replicas under it must not share.
_CONDITIONS = (
    ("", "sellers on different accounts", (lambda m: m.account,)),
    ("owner", "sellers of different owners (accounts and networks)",
     (lambda m: m.account, lambda m: m.network)),
    ("country", "sellers in different countries", (lambda m: m.country,)),
    ("cpu", "sellers with different CPUs", (lambda m: m.cpu,)),
)


def shortfall(diversity, k, placed, candidates, needBand=False):
    """
    Why a replica group of C{k} cannot be completed now, in one line, or
    None when it can: the first condition that the replicas placed
    (C{placed}, marks) and the sellers that could take one (C{candidates},
    marks, best first) have too few different values for, else that
    placement cannot meet them all at once.
    """
    usable = [m for m in candidates if conflict(diversity, m, (), needBand) is None]
    marks = list(placed) + usable
    for condition, what, keys in _CONDITIONS:
        if not condition or condition in diversity:
            if condition == "cpu" and needBand:
                keys += (lambda m: m.band,)
            n = _distinct(marks, *keys)
            if n < k:
                return f"needs {k} {what}, {n} online"
    n = greedy(diversity, placed, usable, needBand, enough=k)
    if n < k:
        return f"needs {k} sellers that differ in {describe(diversity)} at once, {n} online"
    return None


def ordered(diversity):
    """The names of C{diversity} in the order of DIVERSITY."""
    return [d for d in DIVERSITY if d in diversity]


def describe(diversity):
    """The diversity as the command line writes it ("account" when it asks nothing more)."""
    return ",".join(ordered(diversity)) or "account"
