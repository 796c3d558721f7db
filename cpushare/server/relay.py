"""
The channel relay: links a channel on one connection to a channel on
another and forwards each frame without looking inside it.

A link counts the frames and bytes it delivered each way (what a VM's
traffic is billed for) and the frames it had to drop because the
receiving connection's queue was full; a dropped frame is never counted
as traffic.  Frames on a channel that is not linked are dropped by the
multiplexer and counted there; they are never delivered anywhere else.  A
link is owned by both of its sessions (C{session.links}, by channel) and
goes away with either.

A VM's link is also metered (L{Link.meter}): C{allowance} is the bytes
(both ways together) it may still deliver before the funds held for the
lease are spent.  A frame that does not fit is dropped, counted in
C{overAllowance}, and C{onSpent} is called (once per meter) so that the
market bills the lease at once, and stops the VM when its funds cannot
hold more, before anything more is charged.  L{Link.watchFirstAB} asks
to be called once, just after the first frame from A reached B: for a
VM's NIC, the first frame that reached the buyer's network, which is when
its billing starts.  Links nobody pays for are not metered.

Each of these is a different forwarding function put in the sessions'
C{routes}, so that a frame on a link pays only for the checks that link
needs: an unmetered link costs what it did before metering existed.

A metered frame is checked against its direction's share of what is left
(C{limitAB}, C{limitBA}: what C{bytesAB} and C{bytesBA} may reach): one
comparison with the count it computes anyway.  The two shares never add
up to more than is left, so a frame within its share fits the allowance.
Only a frame past its share looks at the whole allowance
(L{Link._share}): it goes if it fits what is left, and its direction gets
a new share, half of what the other direction does not hold (the other's
share is taken back only when the frame needs it).  So every frame is
decided exactly as against the allowance itself, and traffic both ways
does not look at the whole allowance at every frame.  A share is at most
L{SHARE} bytes, so that the numbers compared stay below 2**30 (which
CPython compares fastest) until a link has carried about a GiB.
"""

from cpushare.protocol.commands import ChannelBusy

SHARE = 1 << 24     # the most bytes one direction takes from the allowance at once


class Link:
    __slots__ = (
        "a", "channelA", "b", "channelB",
        "framesAB", "bytesAB", "droppedAB",
        "framesBA", "bytesBA", "droppedBA",
        "limit", "limitAB", "limitBA", "overAllowance", "onSpent", "onFirstAB",
    )

    def __init__(self, a, channelA, b, channelB):
        self.a, self.channelA, self.b, self.channelB = a, channelA, b, channelB
        self.framesAB = self.bytesAB = self.droppedAB = 0
        self.framesBA = self.bytesBA = self.droppedBA = 0
        self.limit = None               # bytesAB + bytesBA may reach this; None: no limit
        self.limitAB = self.limitBA = 0   # each direction's share, as a limit on its count
        self.overAllowance = 0
        self.onSpent = None
        self.onFirstAB = None

    def meter(self, allowance, onSpent=None):
        """
        Deliver at most C{allowance} more bytes (None: no limit); the first
        frame that does not fit calls C{onSpent}.
        """
        self.limit = None if allowance is None else self.bytesAB + self.bytesBA + allowance
        self.limitAB, self.limitBA = self.bytesAB, self.bytesBA   # no share yet
        self.onSpent = onSpent
        self._route()

    @property
    def allowance(self):
        """The bytes (both ways together) it may still deliver; None: no limit."""
        if self.limit is None:
            return None
        return self.limit - self.bytesAB - self.bytesBA

    def watchFirstAB(self, callback):
        """Call C{callback} once, after the first frame from A reached B (None: do not)."""
        self.onFirstAB = callback
        self._route()

    def _route(self):
        """Point both ends' routes at the forwarding functions this link needs now."""
        if self.a.links.get(self.channelA) is not self:
            return              # unlinked
        metered = self.allowance is not None
        if self.onFirstAB is not None:
            self.a.route(self.channelA, self.firstAB)
        else:
            self.a.route(self.channelA, self.meteredAB if metered else self.forwardAB)
        self.b.route(self.channelB, self.meteredBA if metered else self.forwardBA)

    def _spent(self):
        self.overAllowance += 1
        onSpent, self.onSpent = self.onSpent, None
        if onSpent is not None:
            onSpent()

    def forwardAB(self, payload):
        if self.b.sendFrame(self.channelB, payload):
            self.framesAB += 1
            self.bytesAB += len(payload)
        else:
            self.droppedAB += 1

    def forwardBA(self, payload):
        if self.a.sendFrame(self.channelA, payload):
            self.framesBA += 1
            self.bytesBA += len(payload)
        else:
            self.droppedBA += 1

    def _share(self, n, towardsB):
        """
        A frame of C{n} bytes is past its direction's share: decide on the
        whole allowance.  If it fits, its direction gets a new share: half
        of what the other direction does not hold (at most L{SHARE}), and
        never less than C{n}, taking the other's share back only if the
        frame needs it.  If it does not fit, the allowance is spent.
        """
        left = self.limit - self.bytesAB - self.bytesBA
        if towardsB:
            other = self.limitBA - self.bytesBA
        else:
            other = self.limitAB - self.bytesAB
        if n > left - other:
            if n > left:
                self._spent()
                return False
            self.limitAB, self.limitBA = self.bytesAB, self.bytesBA
            other = 0
        share = max(n, min((left - other) // 2, SHARE))
        if towardsB:
            self.limitAB = self.bytesAB + share
        else:
            self.limitBA = self.bytesBA + share
        return True

    def meteredAB(self, payload):
        count = self.bytesAB + len(payload)
        if count > self.limitAB and not self._share(len(payload), True):
            return
        if self.b.sendFrame(self.channelB, payload):
            self.framesAB += 1
            self.bytesAB = count
        else:
            self.droppedAB += 1

    def meteredBA(self, payload):
        count = self.bytesBA + len(payload)
        if count > self.limitBA and not self._share(len(payload), False):
            return
        if self.a.sendFrame(self.channelA, payload):
            self.framesBA += 1
            self.bytesBA = count
        else:
            self.droppedBA += 1

    def firstAB(self, payload):
        frames = self.framesAB
        if self.allowance is None:
            self.forwardAB(payload)
        else:
            self.meteredAB(payload)
        if self.framesAB != frames:
            first, self.onFirstAB = self.onFirstAB, None
            self._route()
            if first is not None:
                first()

    def statsFor(self, session, channel):
        """This link as seen from one end: out is what that end sent."""
        if session is self.a and channel == self.channelA:
            return dict(
                channel=self.channelA, peer_session=self.b.sessionId,
                peer_channel=self.channelB, frames_out=self.framesAB,
                bytes_out=self.bytesAB, frames_in=self.framesBA,
                bytes_in=self.bytesBA, dropped=self.droppedAB,
            )
        return dict(
            channel=self.channelB, peer_session=self.a.sessionId,
            peer_channel=self.channelA, frames_out=self.framesBA,
            bytes_out=self.bytesBA, frames_in=self.framesAB,
            bytes_in=self.bytesAB, dropped=self.droppedBA,
        )


class Relay:
    """
    Sessions given to the relay have C{route(channel, handler)} and
    C{unroute(channel)} (L{cpushare.protocol.mux.Routing}), a C{links} dict, a
    C{sendFrame(channel, payload)} method and C{channelUnlinked(channel,
    reason)} to be told when a link goes.
    """

    def __init__(self):
        self.links = set()

    def link(self, a, channelA, b, channelB):
        if (a is b and channelA == channelB) or channelA in a.links:
            raise ChannelBusy(f"channel {channelA} is already linked")
        if channelB in b.links:
            raise ChannelBusy(f"the peer's channel {channelB} is already linked")
        link = Link(a, channelA, b, channelB)
        a.links[channelA] = link
        b.links[channelB] = link
        a.route(channelA, link.forwardAB)
        b.route(channelB, link.forwardBA)
        self.links.add(link)
        return link

    def unlink(self, link, reason, notify=()):
        """
        Remove C{link}; the ends in C{notify} (sessions) are told why.
        """
        if link not in self.links:
            return
        self.links.discard(link)
        for session, channel in ((link.a, link.channelA), (link.b, link.channelB)):
            session.links.pop(channel, None)
            session.unroute(channel)
            if session in notify:
                session.channelUnlinked(channel, reason)

    def dropSession(self, session, reason):
        """A session went away: unlink all its links, telling the other ends."""
        for link in list(session.links.values()):
            others = tuple(s for s in (link.a, link.b) if s is not session)
            self.unlink(link, reason, notify=others)
