"""
A buyer's screens: which sellers an order may use.

Every screen is optional.  A seller passes an order's screens when every
screen given holds for the figures the market knows about it; a figure the
market has not measured yet (a new seller's bandwidth, say) fails a screen
on it, because a buyer who asks for a floor wants it proven.  The first
screen a seller fails is the reason given by `cpushare sellers --explain`
and by an order that waits.

The order of candidates among the sellers that pass is fixed: the lowest
cost a VM-hour first, then the better rating, then the lower latency, then
the older connection.  A VM-hour's cost is what the buyer will really pay
for it: the seller's price a core-hour times the VM's cores, plus its fee
a GB times the traffic the order expects a VM-hour (C{traffic}, in GB;
DEFAULT_TRAFFIC when the order does not say).
"""

import math
import re

import attr

from cpushare.protocol.commands import BadRequest
from cpushare.server.money.ledger import MAX_AMOUNT, formatAmount

_COUNTRY = re.compile(r"^[A-Z]{2}$")

MAX_SCREEN_LATENCY_MS = 600_000.0
MAX_SCREEN_BANDWIDTH = 1_000_000.0    # Mbps
MAX_SCREEN_CPU = 1e9
MAX_SCREEN_VALIDATED = 10**9
# The network traffic a VM-hour is expected to carry, in GB, when an order
# does not say: what ranking weighs sellers' fees a GB with.
DEFAULT_TRAFFIC = 1.0
MAX_TRAFFIC = 1_000_000.0


def country(code, what="country"):
    """An ISO 3166 alpha-2 code, upper case, or BadRequest."""
    code = str(code).strip().upper()
    if not _COUNTRY.match(code):
        raise BadRequest(f"{what} {code!r} is not a two-letter country code like IT or US")
    return code


def rating(good, bad):
    """
    A seller's rating from its good and bad votes: the lower bound of the
    95% Wilson score interval of the share of good votes.  It is 0 with no
    votes, 0.44 for 3 good of 3 and 0.94 for 290 good of 300: many votes
    are needed to be trusted, and a few cannot outweigh many.
    """
    n = good + bad
    if n == 0:
        return 0.0
    z = 1.959964
    p = good / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt((p * (1 - p) + z * z / (4 * n)) / n)
    return max(0.0, (centre - spread) / (1 + z * z / n))


class Exclusion(str):
    """Why a seller fails a screen: the text, and the screen's option as C{screen}."""

    def __new__(cls, screen, text):
        self = str.__new__(cls, text)
        self.screen = screen
        return self


@attr.s(frozen=True)
class Figures:
    """What the market knows about one seller online now."""

    name = attr.ib()
    price = attr.ib()                   # micro-units per core-hour
    netFee = attr.ib()                  # micro-units per GB
    country = attr.ib()                 # "IT" or None when not said
    rating = attr.ib()                  # 0..1, see rating()
    votes = attr.ib()                   # buyer accounts that rated it
    latencyMs = attr.ib()               # None until measured
    bandwidthMbps = attr.ib()           # None until measured
    cpuScore = attr.ib()                # None until measured
    cpu = attr.ib(default=None)         # (vendor, family, model) as it says, or None
    validated = attr.ib(default=0)      # results verdicts and canaries accepted
    errorRate = attr.ib(default=None)   # share of its checked results found wrong, or None
    # Why it cannot take trusted leases (no TPM enrolled, or its last
    # attestation was refused), or None: its TPM's last quote passed.
    untrusted = attr.ib(default="has no TPM enrolled (cpushare-seller --tpm)")
    attested = attr.ib(default=None)    # when its last quote passed, or None
    trustedPrice = attr.ib(default=None)  # its price a core-hour of trusted leases


def _number(value, what, low, high):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or not low <= value <= high:
        raise BadRequest(f"{what} must be between {low:g} and {high:g}, not {value!r}")
    return value


def _count(value, what, high):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise BadRequest(f"{what} must be a whole number between 0 and {high}, not {value!r}")
    return value


def _money(value, what):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_AMOUNT:
        raise BadRequest(f"{what} must be an amount between 0 and {formatAmount(MAX_AMOUNT)}")
    return value


@attr.s(frozen=True)
class Screens:
    maxPrice = attr.ib(default=None)        # micro-units per core-hour
    minRating = attr.ib(default=None)
    maxLatencyMs = attr.ib(default=None)
    minBandwidthMbps = attr.ib(default=None)
    minCpuScore = attr.ib(default=None)
    countries = attr.ib(default=())         # only these, when given
    notCountries = attr.ib(default=())
    maxNetFee = attr.ib(default=None)       # micro-units per GB
    traffic = attr.ib(default=DEFAULT_TRAFFIC)  # GB a VM-hour, to rank by cost (not a screen)
    minValidated = attr.ib(default=None)    # results accepted by verdicts and canaries
    trusted = attr.ib(default=False)        # only attested sellers, at their trusted prices

    @classmethod
    def fromArguments(cls, max_price=None, min_rating=None, max_latency=None,
                      min_bandwidth=None, min_cpu=None, countries=None,
                      not_countries=None, max_net_fee=None, traffic=None,
                      min_validated=None, trusted=None):
        """Screens from a command's arguments, checked: BadRequest names a bad one."""
        only = tuple(sorted({country(c, "country") for c in countries or ()}))
        never = tuple(sorted({country(c, "excluded country") for c in not_countries or ()}))
        both = set(only) & set(never)
        if both:
            raise BadRequest(f"{', '.join(sorted(both))} is both wanted and excluded")
        return cls(
            maxPrice=_money(max_price, "the maximum price"),
            minRating=_number(min_rating, "the minimum rating", 0.0, 1.0),
            maxLatencyMs=_number(max_latency, "the maximum latency (ms)", 0.0,
                                 MAX_SCREEN_LATENCY_MS),
            minBandwidthMbps=_number(min_bandwidth, "the minimum bandwidth (Mbps)", 0.0,
                                     MAX_SCREEN_BANDWIDTH),
            minCpuScore=_number(min_cpu, "the minimum CPU score", 0.0, MAX_SCREEN_CPU),
            countries=only,
            notCountries=never,
            maxNetFee=_money(max_net_fee, "the maximum network fee"),
            traffic=DEFAULT_TRAFFIC if traffic is None else _number(
                traffic, "the expected traffic (GB a VM-hour)", 0.0, MAX_TRAFFIC),
            minValidated=_count(min_validated, "the minimum of validated results"
                                " (--min-validated)", MAX_SCREEN_VALIDATED),
            trusted=bool(trusted),
        )

    def toArguments(self):
        """The inverse of fromArguments, for storing an order's screens."""
        values = {
            "max_price": self.maxPrice, "min_rating": self.minRating,
            "max_latency": self.maxLatencyMs, "min_bandwidth": self.minBandwidthMbps,
            "min_cpu": self.minCpuScore, "countries": list(self.countries) or None,
            "not_countries": list(self.notCountries) or None,
            "max_net_fee": self.maxNetFee,
            "traffic": None if self.traffic == DEFAULT_TRAFFIC else self.traffic,
            "min_validated": self.minValidated,
            "trusted": True if self.trusted else None,
        }
        return {k: v for k, v in values.items() if v is not None}

    def exclusion(self, seller):
        """Why C{seller} (L{Figures}) fails these screens (an L{Exclusion}), or None."""
        fmt = formatAmount
        if self.trusted and seller.untrusted is not None:
            return Exclusion("--trusted", seller.untrusted)
        if self.maxPrice is not None and seller.price > self.maxPrice:
            return Exclusion("--max-price", f"asks {fmt(seller.price)} a core-hour,"
                             f" more than --max-price {fmt(self.maxPrice)}")
        if self.maxNetFee is not None and seller.netFee > self.maxNetFee:
            return Exclusion("--max-net-fee", f"charges {fmt(seller.netFee)} a GB,"
                             f" more than --max-net-fee {fmt(self.maxNetFee)}")
        if self.countries and seller.country not in self.countries:
            where = seller.country or "an unstated country"
            return Exclusion("--country",
                             f"is in {where}, not in --country {','.join(self.countries)}")
        if self.notCountries and seller.country in self.notCountries:
            return Exclusion("--not-country", f"is in {seller.country}, excluded by --not-country")
        if self.minRating is not None and seller.rating < self.minRating:
            return Exclusion("--min-rating", f"is rated {seller.rating:.2f} ({seller.votes} votes),"
                             f" below --min-rating {self.minRating:g}")
        if self.minValidated is not None and seller.validated < self.minValidated:
            return Exclusion("--min-validated", f"has {seller.validated} validated results,"
                             f" fewer than --min-validated {self.minValidated}")
        if self.maxLatencyMs is not None:
            if seller.latencyMs is None:
                return Exclusion("--max-latency", "has no latency measured yet (--max-latency)")
            if seller.latencyMs > self.maxLatencyMs:
                return Exclusion("--max-latency", f"is {seller.latencyMs:.1f} ms away,"
                                 f" more than --max-latency {self.maxLatencyMs:g}")
        if self.minBandwidthMbps is not None:
            if seller.bandwidthMbps is None:
                return Exclusion("--min-bandwidth",
                                 "has no bandwidth measured yet (--min-bandwidth)")
            if seller.bandwidthMbps < self.minBandwidthMbps:
                return Exclusion("--min-bandwidth", f"has {seller.bandwidthMbps:.1f} Mbps,"
                                 f" less than --min-bandwidth {self.minBandwidthMbps:g}")
        if self.minCpuScore is not None:
            if seller.cpuScore is None:
                return Exclusion("--min-cpu", "has no CPU score measured yet (--min-cpu)")
            if seller.cpuScore < self.minCpuScore:
                return Exclusion("--min-cpu", f"scores {seller.cpuScore:.0f} on the CPU benchmark,"
                                 f" less than --min-cpu {self.minCpuScore:g}")
        return None


def hourCost(seller, cores=1, traffic=DEFAULT_TRAFFIC):
    """
    What a VM of C{cores} cores carrying C{traffic} GB an hour costs a
    VM-hour on C{seller} at full tilt, in micro-units.
    """
    return seller.price * cores + seller.netFee * int(traffic * 1000) // 1000


def preference(seller, connectedAt=0.0, cores=1, traffic=DEFAULT_TRAFFIC):
    """The sort key among sellers that pass: cheapest, best rated, nearest, oldest."""
    latency = seller.latencyMs if seller.latencyMs is not None else math.inf
    return (hourCost(seller, cores, traffic), -seller.rating, latency, connectedAt)
