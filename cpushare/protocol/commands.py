"""
The control commands (Twisted AMP) spoken on channel 0.

Every error a command can raise is declared here, so the other side gets
a typed failure with a one-line description it can show a user.
"""

from twisted.protocols import amp

from cpushare.protocol.arguments import Blob, Sha256, Text


class CPUShareError(Exception):
    """An error whose message is meant for the user."""


class NotAuthenticated(CPUShareError):
    pass


class BadRequest(CPUShareError):
    pass


class NameTaken(CPUShareError):
    pass


class NoSuchSession(CPUShareError):
    pass


class ChannelBusy(CPUShareError):
    pass


class NotPermitted(CPUShareError):
    pass


class QuotaExceeded(CPUShareError):
    pass


COMMON_ERRORS = {
    NotAuthenticated: b"NOT_AUTHENTICATED",
    BadRequest: b"BAD_REQUEST",
}

ROLES = ("seller", "buyer", "cli")


class Hello(amp.Command):
    """
    The first command of an authenticated client: says what it is.  The
    server answers with the account the certificate belongs to and its
    heartbeat settings.
    """

    arguments = [(b"role", amp.Unicode()), (b"software", amp.Unicode())]
    response = [
        (b"account", amp.Unicode()),
        (b"account_id", amp.Integer()),
        (b"session", amp.Integer()),
        (b"heartbeat", amp.Float()),
        (b"timeout", amp.Float()),
    ]
    errors = COMMON_ERRORS


class Register(amp.Command):
    """
    Create an account: the server signs the client's certificate request.
    The only command a connection without a client certificate may send.
    """

    arguments = [(b"name", amp.Unicode()), (b"csr", amp.String())]
    response = [(b"certificate", amp.String()), (b"account_id", amp.Integer())]
    # NotPermitted: over a registration limit, or the key has an account already.
    errors = {**COMMON_ERRORS, NameTaken: b"NAME_TAKEN", NotPermitted: b"NOT_PERMITTED"}


class Rekey(amp.Command):
    """
    A new client certificate for this connection's account, for the key in
    C{csr} (made on the client).  The certificate this connection uses is
    revoked once the new one is first used to connect.
    """

    arguments = [(b"csr", amp.String())]
    response = [(b"certificate", amp.String())]
    errors = {**COMMON_ERRORS, NotPermitted: b"NOT_PERMITTED"}


class WhoAmI(amp.Command):
    arguments = []
    response = [
        (b"name", amp.Unicode()),
        (b"account_id", amp.Integer()),
        (b"created", amp.Unicode()),
        (b"fingerprint", amp.Unicode()),
        (b"session", amp.Integer()),
    ]
    errors = COMMON_ERRORS


class SetWebPassword(amp.Command):
    """
    Set this account's password for the market's web site (at least 10
    characters); its browsers logged in before are logged out.
    NotPermitted: the market is too busy hashing passwords just now.
    """

    arguments = [(b"password", amp.Unicode())]
    response = []
    errors = {**COMMON_ERRORS, NotPermitted: b"NOT_PERMITTED"}


class WebLoginLink(amp.Command):
    """
    A link to the market's web site that logs this account in, once, within
    five minutes.  NotPermitted: the market has no web site.
    """

    arguments = []
    response = [(b"url", amp.Unicode())]
    errors = {**COMMON_ERRORS, NotPermitted: b"NOT_PERMITTED"}


# A seller's terms: micro-units of the market's currency per core-hour and
# per GB (10^9 bytes) of network traffic, and an ISO 3166 country code.
TERMS = [
    (b"price", amp.Integer(optional=True)),
    (b"net_fee", amp.Integer(optional=True)),
    (b"country", amp.Unicode(optional=True)),
]

# The price a core-hour of a seller's trusted (TPM-attested) leases; never
# given: its price.
TRUSTED_TERMS = [(b"trusted_price", amp.Integer(optional=True))]


# The seller's CPU as its client reads it (/proc/cpuinfo): the vendor, the
# family and the model, each at most CPU_TEXT characters; for replicas that
# must run on different CPUs.
CPU_TEXT = 64
CPU = [
    (b"cpu_vendor", Text(CPU_TEXT, optional=True)),
    (b"cpu_family", Text(CPU_TEXT, optional=True)),
    (b"cpu_model", Text(CPU_TEXT, optional=True)),
]


class Offer(amp.Command):
    """
    A seller announces (or changes) the capacity it offers, and the terms
    its owner gave on its command line, if any; the answer is the terms in
    force (those stored for the account, else the market's defaults).
    The seller's CPU (C{CPU}) is what it says; the market cannot check it.
    """

    arguments = [(b"cores", amp.Integer()), (b"memory", amp.Integer())] + TERMS + CPU + \
        TRUSTED_TERMS
    response = TERMS
    errors = COMMON_ERRORS


PROBE_CHUNK = 60000


class Probe(amp.Command):
    """
    Server to seller: bytes to measure the connection's bandwidth towards
    the seller.  The seller answers as soon as it has them, with C{digest},
    L{cpushare.protocol.proof.probeDigest} of C{nonce} and C{data}; with
    C{back} it also answers with that many bytes, C{proof.probeFill} of
    C{nonce}, to measure the other way.
    """

    arguments = [(b"nonce", amp.String()), (b"data", amp.String()),
                 (b"back", amp.Integer(optional=True))]
    response = [(b"digest", amp.String(optional=True)), (b"data", amp.String(optional=True))]
    errors = COMMON_ERRORS


class SetTerms(amp.Command):
    """Change this account's terms as a seller, also while its seller runs."""

    arguments = TERMS + TRUSTED_TERMS
    response = TERMS
    errors = COMMON_ERRORS


# A buy order's screens; see cpushare.server.market.screens.  Money in micro-units.
SCREENS = [
    (b"max_price", amp.Integer(optional=True)),
    (b"min_rating", amp.Float(optional=True)),
    (b"max_latency", amp.Float(optional=True)),
    (b"min_bandwidth", amp.Float(optional=True)),
    (b"min_cpu", amp.Float(optional=True)),
    (b"countries", amp.ListOf(amp.Unicode(), optional=True)),
    (b"not_countries", amp.ListOf(amp.Unicode(), optional=True)),
    (b"max_net_fee", amp.Integer(optional=True)),
    # Not a screen: the GB a VM-hour the order expects, to rank sellers by cost.
    (b"traffic", amp.Float(optional=True)),
    # At least this many results accepted by verdicts and canaries.
    (b"min_validated", amp.Integer(optional=True)),
    # Only sellers whose TPM attestation passed, at their trusted prices.
    (b"trusted", amp.Boolean(optional=True)),
]

# Replicated runs: each VM run C{replicas} times on sellers that differ in
# what C{diverse} names (country, cpu, owner; all three by default).
REPLICAS = [
    (b"replicas", amp.Integer(optional=True)),
    (b"diverse", amp.ListOf(Text(16), optional=True)),
]


SELLERS_PAGE = 200


class ListSellers(amp.Command):
    """
    The sellers online now that pass the screens given, in the order an
    order with those screens would use them (cheapest, best rated, nearest
    first), a page at a time (an AMP value is limited to 64 KiB): C{offset}
    into that list, at most C{SELLERS_PAGE} a page; C{total} is how many
    there are.  With C{explain}, the sellers the screens exclude follow,
    each with C{excluded}: the reason.
    """

    arguments = [(b"offset", amp.Integer()),
                 (b"explain", amp.Boolean(optional=True))] + SCREENS + REPLICAS
    response = [
        (b"sellers", amp.AmpList([
            (b"name", amp.Unicode()),
            (b"session", amp.Integer()),
            (b"cores", amp.Integer()),
            (b"memory", amp.Integer()),
            (b"free_cores", amp.Integer()),
            (b"free_memory", amp.Integer()),
            (b"latency_ms", amp.Float(optional=True)),
            (b"connected", amp.Float()),
            (b"price", amp.Integer()),
            (b"net_fee", amp.Integer()),
            (b"country", amp.Unicode(optional=True)),
            (b"rating", amp.Float()),
            (b"votes", amp.Integer()),
            (b"bandwidth_mbps", amp.Float(optional=True)),
            (b"cpu_score", amp.Float(optional=True)),
            (b"excluded", amp.Unicode(optional=True)),
            (b"cpu", amp.Unicode(optional=True)),
            # Results verdicts and canaries accepted, and the share of its
            # checked results found wrong (absent before any was checked).
            (b"validated", amp.Integer(optional=True)),
            (b"error_rate", amp.Float(optional=True)),
            # Its trusted price; when its TPM's last attestation passed
            # (absent: none did), else why it is not attested.
            (b"trusted_price", amp.Integer(optional=True)),
            (b"attested", amp.Float(optional=True)),
            (b"trust", amp.Unicode(optional=True)),
        ])),
        (b"total", amp.Integer()),
        (b"passing", amp.Integer()),
        # With C{replicas}: whether a replica group could be placed now, or
        # which condition is short.
        (b"replicas", amp.Unicode(optional=True)),
    ]
    errors = COMMON_ERRORS


class Ping(amp.Command):
    """
    A heartbeat, sent both ways.  The responder echoes C{nonce}, a random
    value the sender checks (the sender times the round trip on its own
    clock), and tells the latency it measured itself.
    """

    arguments = [(b"nonce", amp.String())]
    response = [(b"nonce", amp.String()), (b"latency_ms", amp.Float(optional=True))]


class MeshToken(amp.Command):
    """
    A seller asks for a token to send to the market's UDP port, which
    answers with the address the datagram came from (L{cpushare.mesh.reflect}).
    The token is good for 60 seconds and for this session only.  A
    BadRequest when the market listens on no UDP port.
    """

    arguments = []
    response = [(b"token", amp.String()), (b"udp_port", amp.Integer())]
    errors = COMMON_ERRORS


class MeshCandidates(amp.Command):
    """
    A seller's candidate addresses for direct paths (at most 8: the public
    one the market told it, its local ones), each an IPv4 or IPv6 literal
    and a port; the market keeps them for brokering.  A BadRequest names
    the first bad one.
    """

    arguments = [(b"candidates", amp.AmpList([
        (b"host", Text(64)), (b"port", amp.Integer())]))]
    response = []
    errors = COMMON_ERRORS


#: The most peers one MeshPeers names, and VMs (MACs) of one peer: a seller
#: of a bigger buyer network reaches the rest through the relay.
MESH_PEERS = 32
MESH_MACS = 64
#: Pairs of sellers a ListPaths page holds at most.
PATHS_PAGE = 200


class MeshPeers(amp.Command):
    """
    Market to seller: the whole view of one buyer network from this
    seller, sent again whenever it changes.  C{vms} are this seller's VMs
    in the network (frames between them stay on the seller; no VM: the
    network left this seller).  Each peer is another seller hosting VMs of
    the network: its session id, the 32-byte secret of the pair, the
    session ids each end writes in the other's datagrams, its candidate
    addresses and its VMs' MACs.
    """

    arguments = [
        (b"network", amp.Integer()),
        (b"vms", amp.ListOf(amp.Integer())),
        (b"peers", amp.AmpList([
            (b"peer", amp.Integer()),
            (b"secret", amp.String()),
            (b"local_session", amp.Integer()),
            (b"remote_session", amp.Integer()),
            (b"candidates", amp.AmpList([(b"host", Text(64)), (b"port", amp.Integer())])),
            (b"macs", amp.ListOf(Text(17))),
        ])),
    ]
    response = []
    errors = COMMON_ERRORS


class MeshReport(amp.Command):
    """
    Seller to market, every report interval and when a path changes: each
    path's state (trying, direct or relayed), its round trip, and the bytes
    of frames each of its VMs sent to and received from the peer directly
    since the path was brokered (both ends count; the market bills the
    smaller count).
    """

    arguments = [(b"paths", amp.AmpList([
        (b"network", amp.Integer()),
        (b"peer", amp.Integer()),
        (b"state", Text(16)),
        (b"rtt_ms", amp.Float(optional=True)),
        (b"vms", amp.AmpList([
            (b"vm", amp.Integer()),
            (b"sent", amp.Integer()),
            (b"received", amp.Integer()),
        ])),
    ]))]
    response = []
    errors = COMMON_ERRORS


class ListPaths(amp.Command):
    """
    Buyer: the paths between the sellers of this account's VMs, a page at a
    time after pair C{after} (an index): each pair of sellers, direct or
    relayed as both ends last said, with its round trip and the bytes
    carried directly (the billed, smaller count).
    """

    arguments = [(b"after", amp.Integer(optional=True))]
    response = [
        (b"paths", amp.AmpList([
            (b"index", amp.Integer()),
            (b"seller_a", amp.Unicode()),
            (b"seller_b", amp.Unicode()),
            (b"vms_a", amp.ListOf(amp.Integer())),
            (b"vms_b", amp.ListOf(amp.Integer())),
            (b"state", amp.Unicode()),
            (b"rtt_ms", amp.Float(optional=True)),
            (b"direct_bytes", amp.Integer()),
            (b"why", amp.Unicode(optional=True)),
        ])),
        (b"more", amp.Boolean()),
    ]
    errors = COMMON_ERRORS


class LinkChannel(amp.Command):
    """
    Link one of this connection's channels to a channel of another
    connection of the same account: frames sent on either are delivered on
    the other.  (The server also links channels itself, for VM ports.)
    """

    arguments = [
        (b"channel", amp.Integer()),
        (b"peer_session", amp.Integer()),
        (b"peer_channel", amp.Integer()),
    ]
    response = []
    errors = {
        **COMMON_ERRORS,
        NoSuchSession: b"NO_SUCH_SESSION",
        ChannelBusy: b"CHANNEL_BUSY",
        NotPermitted: b"NOT_PERMITTED",
    }


class UnlinkChannel(amp.Command):
    arguments = [(b"channel", amp.Integer())]
    response = []
    errors = COMMON_ERRORS


class ChannelLinked(amp.Command):
    """Server to client: frames on C{channel} now reach a peer."""

    arguments = [
        (b"channel", amp.Integer()),
        (b"peer_session", amp.Integer()),
        (b"peer_channel", amp.Integer()),
    ]
    response = []
    requiresAnswer = False


class ChannelUnlinked(amp.Command):
    """Server to client: C{channel} is no longer linked, and why."""

    arguments = [(b"channel", amp.Integer()), (b"reason", amp.Unicode())]
    response = []
    requiresAnswer = False


LINKS_PAGE = 300


class LinkStats(amp.Command):
    """
    The frames and bytes the relay counted on this connection's links, by
    channel, a page at a time (see L{cpushare.protocol.paging}): at most
    LINKS_PAGE, those of channels above C{after} when given; C{more} says
    whether others follow.
    """

    arguments = [(b"after", amp.Integer(optional=True))]
    response = [
        (b"links", amp.AmpList([
            (b"channel", amp.Integer()),
            (b"peer_session", amp.Integer()),
            (b"peer_channel", amp.Integer()),
            (b"frames_out", amp.Integer()),
            (b"bytes_out", amp.Integer()),
            (b"frames_in", amp.Integer()),
            (b"bytes_in", amp.Integer()),
            (b"dropped", amp.Integer()),
        ])),
        (b"unrouted", amp.Integer()),
        (b"more", amp.Boolean()),
    ]
    errors = COMMON_ERRORS


IMAGE_CHUNK = 60000


class ImageUploadStart(amp.Command):
    """
    Announce an image upload.  C{needed} is False when this account already
    holds the image: nothing is sent.
    """

    arguments = [(b"sha256", amp.Unicode()), (b"size", amp.Integer()), (b"name", amp.Unicode())]
    response = [(b"needed", amp.Boolean())]
    errors = {**COMMON_ERRORS, QuotaExceeded: b"QUOTA_EXCEEDED"}


class ImageUploadChunk(amp.Command):
    """Bytes of the upload at C{offset}, in order, at most IMAGE_CHUNK at a time."""

    arguments = [(b"sha256", amp.Unicode()), (b"offset", amp.Integer()), (b"data", amp.String())]
    response = []
    errors = COMMON_ERRORS


class ImageUploadFinish(amp.Command):
    """All bytes sent: the server checks size and sha256 and stores the image."""

    arguments = [(b"sha256", amp.Unicode())]
    response = []
    errors = COMMON_ERRORS


IMAGES_PAGE = 300


class ListImages(amp.Command):
    """
    This account's images in the order they were uploaded, a page at a time
    (see L{cpushare.protocol.paging}): at most IMAGES_PAGE, those after the
    image C{after} (a sha256 the previous page ended with) when given;
    C{more} says whether others follow.  C{encrypted}: the market holds the
    image's key (L{SetImageKey}).
    """

    arguments = [(b"after", amp.Unicode(optional=True))]
    response = [
        (b"images", amp.AmpList([
            (b"sha256", amp.Unicode()),
            (b"name", amp.Unicode()),
            (b"size", amp.Integer()),
            (b"uploaded", amp.Unicode()),
            (b"encrypted", amp.Boolean(optional=True)),
        ])),
        (b"more", amp.Boolean()),
    ]
    errors = COMMON_ERRORS


class SetImageKey(amp.Command):
    """
    Give the market the key of this account's encrypted image C{sha256}
    (L{cpushare.imagecrypt}: 32 bytes, which must open the image).  The
    market keeps it sealed and releases it only wrapped to the TPM of a
    seller whose attestation just passed; it never sends it back.  An image
    with a key is ordered only as a trusted order.
    """

    arguments = [(b"sha256", amp.Unicode()), (b"key", amp.String())]
    response = []
    errors = COMMON_ERRORS


# -- orders and VMs
#
# Channel numbers for a VM are fixed by its id, on every connection that
# carries them: the NIC is channel 2*vm, the serial console 2*vm+1.


class NoSuchVM(CPUShareError):
    pass


VM_ERRORS = {**COMMON_ERRORS, NoSuchVM: b"NO_SUCH_VM"}


def nicChannel(vm):
    return 2 * vm


def consoleChannel(vm):
    return 2 * vm + 1


class PlaceOrder(amp.Command):
    """
    Buyer: run C{vms} VMs of C{cores} cores and C{memory} MB each, booting
    the image C{image} (a sha256 this account uploaded), on sellers that
    pass the screens.  VMs that fit on sellers online now are allocated at
    once, the cheapest first; the rest wait for capacity, and C{waiting}
    says why they could not be placed now.  C{budget} caps what the order
    may spend, in micro-units.

    With C{replicas} (L{REPLICAS}) each VM runs that many times, a replica
    group, on sellers that differ as C{diverse} asks.  With C{explain},
    C{explain} lists why each replica group that waits does.  With
    C{dry_run} nothing is placed or held: C{order} is 0, C{vm_ids} empty,
    C{allocated} how many VMs would be placed now, C{plan} where (at most
    PLAN_PAGE of them) and C{hold} what the market would hold for them.

    With C{adaptive} (instead of C{replicas}) each VM is run a second time
    only now and then: with probability 1/n for a seller with n
    consecutive valid results.  With C{compare}, replicas whose digests
    differ are compared by the buyer's program (L{CompareResults}) with a
    command it keeps itself.
    """

    arguments = [
        (b"image", amp.Unicode()),
        (b"vms", amp.Integer()),
        (b"cores", amp.Integer()),
        (b"memory", amp.Integer()),
        (b"budget", amp.Integer(optional=True)),
    ] + SCREENS + REPLICAS + [
        (b"dry_run", amp.Boolean(optional=True)),
        (b"explain", amp.Boolean(optional=True)),
        (b"adaptive", amp.Boolean(optional=True)),
        (b"compare", amp.Boolean(optional=True)),
    ]
    response = [(b"order", amp.Integer()), (b"vm_ids", amp.ListOf(amp.Integer())),
                (b"allocated", amp.Integer()), (b"waiting", amp.Unicode(optional=True)),
                (b"explain", amp.ListOf(amp.Unicode(), optional=True)),
                (b"hold", amp.Integer(optional=True)),
                # A trusted dry run: what the VMs placed cost more a
                # VM-hour at full tilt than at their sellers' normal prices.
                (b"premium", amp.Integer(optional=True)),
                (b"plan", amp.AmpList([
                    (b"group", amp.Integer()),
                    (b"seller", amp.Unicode()),
                    (b"country", amp.Unicode(optional=True)),
                    (b"price", amp.Integer()),
                    (b"hold", amp.Integer()),
                ], optional=True))]
    errors = COMMON_ERRORS


PLAN_PAGE = 200


class CancelOrder(amp.Command):
    arguments = [(b"order", amp.Integer())]
    response = [(b"stopped", amp.Integer())]
    errors = COMMON_ERRORS


VMS_PAGE = 200


class ListVMs(amp.Command):
    """
    Buyer: this account's VMs, newest first, a page at a time (see
    L{cpushare.protocol.paging}): at most VMS_PAGE, those older than VM
    C{before} when given; C{more} says whether older ones remain.
    """

    arguments = [(b"all", amp.Boolean(optional=True)),
                 (b"before", amp.Integer(optional=True))]
    response = [
        (b"vms", amp.AmpList([
            (b"vm", amp.Integer()),
            (b"order", amp.Integer()),
            (b"seller", amp.Unicode(optional=True)),
            (b"state", amp.Unicode()),
            (b"mac", amp.Unicode()),
            (b"ip", amp.Unicode(optional=True)),
            (b"cores", amp.Integer()),
            (b"memory", amp.Integer()),
            (b"started", amp.Float(optional=True)),
            (b"ended", amp.Float(optional=True)),
            (b"cpu_seconds", amp.Float()),
            (b"reason", amp.Unicode(optional=True)),
            (b"replica_group", amp.Integer(optional=True)),
        ])),
        (b"more", amp.Boolean()),
    ]
    errors = COMMON_ERRORS


class StopVM(amp.Command):
    """Buyer to server: stop one of its VMs.  Server to seller: stop it."""

    arguments = [(b"vm", amp.Integer())]
    response = []
    errors = VM_ERRORS


class AttachConsole(amp.Command):
    """
    Buyer: link this connection's channel consoleChannel(vm) to the VM's
    serial console.
    """

    arguments = [(b"vm", amp.Integer())]
    response = [(b"channel", amp.Integer())]
    errors = VM_ERRORS


class StartVM(amp.Command):
    """Server to seller: boot a VM (fetching the image first if needed)."""

    arguments = [
        (b"vm", amp.Integer()),
        (b"image", amp.Unicode()),
        (b"size", amp.Integer()),
        (b"cores", amp.Integer()),
        (b"memory", amp.Integer()),
        (b"mac", amp.Unicode()),
    ]
    response = []
    errors = COMMON_ERRORS


class FetchImageChunk(amp.Command):
    """Seller: C{length} bytes at C{offset} of the image of VM C{vm}."""

    arguments = [(b"vm", amp.Integer()), (b"offset", amp.Integer()),
                 (b"length", amp.Integer())]
    response = [(b"data", amp.String())]
    errors = VM_ERRORS


class VMState(amp.Command):
    """
    Seller to server: a VM's state changed (or a periodic report of its CPU
    seconds).  C{state} is one of L{cpushare.protocol.states.REPORTED}, a
    move the table L{cpushare.protocol.states.TRANSITIONS} holds (or the
    VM's state already); C{reason} says why a VM stopped or failed.
    """

    arguments = [
        (b"vm", amp.Integer()),
        (b"state", amp.Unicode()),
        (b"cpu_seconds", amp.Float()),
        (b"reason", amp.Unicode(optional=True)),
    ]
    response = []
    errors = VM_ERRORS


# The most bytes one VM's result may hold: the seller refuses a bigger one
# (a failed result) and the market any report of a bigger size.
RESULT_MAX = 64 * 1024 * 1024


class ResultReady(amp.Command):
    """
    Seller to server: VM C{vm} wrote its whole result to its port
    org.cpushare.result: C{size} bytes whose sha256 is C{sha256}.  Once a
    VM, on the seller the VM runs on, and C{size} at most RESULT_MAX.
    """

    arguments = [(b"vm", amp.Integer()), (b"sha256", Sha256()), (b"size", amp.Integer()),
                 (b"order", amp.Integer(optional=True))]
    response = []
    errors = VM_ERRORS


class ResultChunk(amp.Command):
    """
    Seller to server, then server to the buyer's program (with C{order}):
    the bytes of VM C{vm}'s result at C{offset}, in order, at most
    IMAGE_CHUNK a chunk, one chunk in flight: the server answers the
    seller once the buyer's program has answered it.  A seller sends
    ResultReady only after its last chunk was answered; the server passes
    it on to the buyer's program (with C{order}) when every byte was.
    """

    arguments = [(b"vm", amp.Integer()), (b"offset", amp.Integer()), (b"data", amp.String()),
                 (b"order", amp.Integer(optional=True))]
    response = []
    errors = VM_ERRORS


RESULTS_PAGE = 300


class ListResults(amp.Command):
    """
    Buyer: the results of this account's order C{order}, a VM a row in
    order of VM, a page at a time (see L{cpushare.protocol.paging}): at
    most RESULTS_PAGE, those after VM C{after} when given.  A row has the seller and what it said of itself (country,
    CPU) when it reported, and the digest and size of the result; a VM
    without a result has neither.
    """

    arguments = [(b"order", amp.Integer()), (b"after", amp.Integer(optional=True))]
    response = [
        (b"results", amp.AmpList([
            (b"vm", amp.Integer()),
            (b"replica_group", amp.Integer(optional=True)),
            (b"state", amp.Unicode()),
            (b"seller", amp.Unicode(optional=True)),
            (b"country", amp.Unicode(optional=True)),
            (b"cpu", amp.Unicode(optional=True)),
            (b"sha256", amp.Unicode(optional=True)),
            (b"size", amp.Integer(optional=True)),
            (b"lease", amp.Integer(optional=True)),
            (b"verdict", amp.Unicode(optional=True)),
        ])),
        (b"more", amp.Boolean()),
    ]
    errors = COMMON_ERRORS


class CompareResults(amp.Command):
    """
    Server to a buyer's program: are the results of VMs C{a} and C{b} of
    its order C{order} the same, as the command the buyer named for that
    order says (its exit status 0: the same)?  The program runs its own
    command on the result files it saved; the server names only the VMs,
    so it can never make the buyer's computer run anything else.  C{same}
    is the answer; C{error} says why there is none (no command for this
    order, a file missing, the command timed out), and then C{same} is
    false.
    """

    arguments = [(b"order", amp.Integer()), (b"a", amp.Integer()), (b"b", amp.Integer())]
    response = [(b"same", amp.Boolean()), (b"error", amp.Unicode(optional=True))]
    errors = COMMON_ERRORS


class ReattachVMs(amp.Command):
    """
    Seller, after reconnecting: the VMs it kept running while it was away.
    The server answers with the ones it still wants; the seller stops the
    others.
    """

    arguments = [(b"vms", amp.ListOf(amp.Integer()))]
    response = [(b"keep", amp.ListOf(amp.Integer()))]
    errors = COMMON_ERRORS


class PortAttached(amp.Command):
    """Server to buyer: VM C{vm}'s NIC now arrives on channel nicChannel(vm)."""

    arguments = [(b"vm", amp.Integer()), (b"mac", amp.Unicode())]
    response = []
    requiresAnswer = False


class PortDetached(amp.Command):
    arguments = [(b"vm", amp.Integer()), (b"reason", amp.Unicode())]
    response = []
    requiresAnswer = False


class VMAddress(amp.Command):
    """Buyer to server: the buyer's DHCP server leased C{ip} to VM C{vm}."""

    arguments = [(b"vm", amp.Integer()), (b"ip", amp.Unicode())]
    response = []
    errors = VM_ERRORS


LEASES_PAGE = 150


class ListLeases(amp.Command):
    """
    Buyer: the leases of this account's VMs, newest first.  A lease is one
    VM's stay on one seller at the terms it was placed at.  A page at a time
    (see L{cpushare.protocol.paging}): at most LEASES_PAGE, those older than
    lease C{before} when given; C{more} says whether older ones remain.
    """

    arguments = [(b"before", amp.Integer(optional=True))]
    response = [(b"leases", amp.AmpList([
        (b"lease", amp.Integer()),
        (b"vm", amp.Integer()),
        (b"order", amp.Integer()),
        (b"seller", amp.Unicode()),
        (b"price", amp.Integer()),
        (b"net_fee", amp.Integer()),
        (b"cores", amp.Integer()),
        (b"started", amp.Float()),
        (b"ended", amp.Float(optional=True)),
        (b"cpu_seconds", amp.Float()),
        (b"net_bytes", amp.Integer()),
        (b"charged", amp.Integer()),
        (b"cpu_cost", amp.Integer()),
        (b"net_cost", amp.Integer()),
        (b"held", amp.Integer()),
        (b"reason", amp.Unicode(optional=True)),
        (b"rating", amp.Unicode(optional=True)),
    ])), (b"more", amp.Boolean())]
    errors = COMMON_ERRORS


class Rate(amp.Command):
    """Buyer: rate the seller of one of this account's leases, once."""

    arguments = [(b"lease", amp.Integer()), (b"good", amp.Boolean()),
                 (b"comment", amp.Unicode(optional=True))]
    response = [(b"seller", amp.Unicode()), (b"rating", amp.Float()), (b"votes", amp.Integer())]
    errors = {**COMMON_ERRORS, NotPermitted: b"NOT_PERMITTED"}
# -- money: adding funds with PayPal, balances, statements, payouts
#
# Amounts are integers of micro-units (millionths) of the market's
# currency, named in each answer.


class NoPayments(CPUShareError):
    """The market takes no payments (PayPal is not set up)."""


class PayPalFailed(CPUShareError):
    """PayPal refused, or could not be asked; the message says what happened to the money."""


MONEY_ERRORS = {**COMMON_ERRORS, NoPayments: b"NO_PAYMENTS", PayPalFailed: b"PAYPAL_FAILED"}


class FundsAdd(amp.Command):
    """
    Buyer: create a PayPal payment of C{amount} (whole cents).  The answer
    says the commission and what reaches the funds, and the link where the
    buyer approves the payment; the funds are added when PayPal sends the
    buyer back to the market's web endpoint.
    """

    arguments = [(b"amount", amp.Integer())]
    response = [
        (b"payment", amp.Unicode()),
        (b"approval_url", amp.Unicode()),
        (b"gross", amp.Integer()),
        (b"commission", amp.Integer()),
        (b"net", amp.Integer()),
        (b"currency", amp.Unicode()),
        (b"commission_percent", amp.Unicode()),
    ]
    errors = MONEY_ERRORS


class Balance(amp.Command):
    """
    This account's balances, the payments waiting at PayPal, and the
    market's terms: its currency, commission and whether it takes payments.
    C{awaiting_verdicts} is what a seller earned with replicated runs whose
    verdicts are not in yet: not in its earnings until they are.
    """

    arguments = []
    response = [
        (b"funds", amp.Integer()),
        (b"held", amp.Integer()),
        (b"earnings", amp.Integer()),
        (b"payout", amp.Integer()),
        (b"awaiting_verdicts", amp.Integer(optional=True)),
        (b"currency", amp.Unicode()),
        (b"commission_percent", amp.Unicode()),
        (b"payments", amp.Boolean()),
        (b"pending", amp.AmpList([
            (b"payment", amp.Unicode()),
            (b"gross", amp.Integer()),
            (b"net", amp.Integer()),
            (b"state", amp.Unicode()),
            (b"created", amp.Unicode()),
        ])),
    ]
    errors = COMMON_ERRORS


STATEMENT_PAGE = 200


class Statement(amp.Command):
    """
    This account's ledger entries, newest first, STATEMENT_PAGE at a time
    (fewer when they would not fit L{cpushare.protocol.paging.PAGE_BYTES}):
    entries older than entry C{before} (all when absent).  Each has the
    balance of its account (funds, held, earnings, payout, pending) after it;
    C{more} says whether older ones remain.
    """

    arguments = [(b"before", amp.Integer(optional=True))]
    response = [
        (b"entries", amp.AmpList([
            (b"entry", amp.Integer()),
            (b"transaction", amp.Integer()),
            (b"time", amp.Unicode()),
            (b"kind", amp.Unicode()),
            (b"memo", amp.Unicode()),
            (b"account", amp.Unicode()),
            (b"amount", amp.Integer()),
            (b"balance", amp.Integer()),
        ])),
        (b"more", amp.Boolean()),
        (b"currency", amp.Unicode()),
    ]
    errors = COMMON_ERRORS


class Earnings(amp.Command):
    """
    Seller: earnings, money on its way out, the payout address and recent
    payouts; C{awaiting_verdicts} is earned with replicated runs whose
    verdicts are not in yet, and cannot be paid out before.
    """

    arguments = []
    response = [
        (b"earnings", amp.Integer()),
        (b"payout", amp.Integer()),
        (b"awaiting_verdicts", amp.Integer(optional=True)),
        (b"currency", amp.Unicode()),
        (b"minimum", amp.Integer()),
        (b"payments", amp.Boolean()),
        (b"email", amp.Unicode(optional=True)),
        (b"payouts", amp.AmpList([
            (b"payout", amp.Integer()),
            (b"amount", amp.Integer()),
            (b"email", amp.Unicode()),
            (b"state", amp.Unicode()),
            (b"paypal_status", amp.Unicode(optional=True)),
            (b"reason", amp.Unicode(optional=True)),
            (b"created", amp.Unicode()),
            (b"updated", amp.Unicode()),
        ])),
    ]
    errors = COMMON_ERRORS


class Payout(amp.Command):
    """
    Seller: pay C{amount} of the earnings (all of them, in whole cents, when
    absent) to the PayPal account C{email} (the last one used when
    absent; a given one is remembered).  C{state} is C{pending} once PayPal
    took it, C{unknown} when PayPal's answer was lost (the operator
    settles it); a refusal is C{PAYPAL_FAILED} and the amount is back in
    the earnings.
    """

    arguments = [(b"amount", amp.Integer(optional=True)), (b"email", amp.Unicode(optional=True))]
    response = [
        (b"payout", amp.Integer()),
        (b"amount", amp.Integer()),
        (b"email", amp.Unicode()),
        (b"state", amp.Unicode()),
        (b"currency", amp.Unicode()),
    ]
    errors = MONEY_ERRORS


# -- trusted computing (docs/protocol.md, "Trusted computing")
#
# TPM evidence crosses as bytes (TPM2B-marshalled structures, DER
# certificates) and JSON; each piece is at most EVIDENCE_MAX bytes, and
# cpushare.attest checks what is inside.

EVIDENCE_MAX = 60000
KEY_MAX = 4096
NONCE_SIZE = 32


class EnrolTPM(amp.Command):
    """
    Seller to market: enrol this seller's TPM: its endorsement key's
    certificate (DER) and public area, and the attestation key it made.
    C{enrolled}: the key is already bound to this account and certificate
    (nothing more to do); otherwise the market's challenge (MakeCredential
    to the endorsement key, for the attestation key), answered once with
    L{ActivateTPM}.  NotPermitted: refused, with the reason.
    """

    arguments = [(b"ek_cert", Blob(EVIDENCE_MAX)), (b"ek_public", Blob(KEY_MAX)),
                 (b"ak_public", Blob(KEY_MAX))]
    response = [(b"enrolled", amp.Boolean()),
                (b"credential_blob", Blob(KEY_MAX, optional=True)),
                (b"encrypted_secret", Blob(KEY_MAX, optional=True))]
    errors = {**COMMON_ERRORS, NotPermitted: b"NOT_PERMITTED"}


class ActivateTPM(amp.Command):
    """
    Seller to market: the secret ActivateCredential recovered from the
    challenge of L{EnrolTPM}; right, the attestation key is bound to this
    account and certificate.  NotPermitted: wrong, or no challenge open.
    """

    arguments = [(b"secret", Blob(256))]
    response = []
    errors = {**COMMON_ERRORS, NotPermitted: b"NOT_PERMITTED"}


class Attest(amp.Command):
    """
    Market to seller: a TPM quote over C{nonce} (NONCE_SIZE random bytes,
    asked once) of the boot chain's PCRs and the PCR the seller's client
    extends, with the event log.  With C{vm}, before and while it runs: the
    seller first measures the image C{image} it boots for it.  C{pcrs} is
    JSON {index: hex digest}, C{events} a JSON list of events.
    """

    arguments = [(b"nonce", Blob(64)), (b"vm", amp.Integer(optional=True)),
                 (b"image", Sha256(optional=True))]
    response = [(b"attest", Blob(KEY_MAX)), (b"signature", Blob(KEY_MAX)),
                (b"pcrs", Blob(KEY_MAX)), (b"events", Blob(EVIDENCE_MAX))]
    errors = COMMON_ERRORS


class BindingKey(amp.Command):
    """
    Market to seller, after a passing quote for VM C{vm}: a key made in the
    TPM that only the PCR values C{pcrs} (JSON, those of that quote) let
    it use, certified by the attestation key over C{nonce}.
    """

    arguments = [(b"vm", amp.Integer()), (b"nonce", Blob(64)), (b"pcrs", Blob(KEY_MAX))]
    response = [(b"public", Blob(KEY_MAX)), (b"certify", Blob(KEY_MAX)),
                (b"signature", Blob(KEY_MAX))]
    errors = COMMON_ERRORS


class ReleaseKey(amp.Command):
    """
    Market to seller: the key of VM C{vm}'s encrypted image, wrapped to
    the key of L{BindingKey}; the seller unwraps it in its TPM.
    """

    arguments = [(b"vm", amp.Integer()), (b"wrapped", Blob(KEY_MAX))]
    response = []
    errors = VM_ERRORS
