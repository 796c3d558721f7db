"""
The channel relay: links a channel on one connection to a channel on
another and forwards each frame without looking inside it.

A link counts frames and bytes each way and the frames it had to drop
because the receiving connection's queue was full.  Frames on a channel
that is not linked are dropped by the multiplexer and counted there; they
are never delivered anywhere else.  A link is owned by both of its
sessions (C{session.links}, by channel) and goes away with either.
"""

from cpushare.protocol.commands import ChannelBusy


class Link:
    __slots__ = (
        "a", "channelA", "b", "channelB",
        "framesAB", "bytesAB", "droppedAB",
        "framesBA", "bytesBA", "droppedBA",
    )

    def __init__(self, a, channelA, b, channelB):
        self.a, self.channelA, self.b, self.channelB = a, channelA, b, channelB
        self.framesAB = self.bytesAB = self.droppedAB = 0
        self.framesBA = self.bytesBA = self.droppedBA = 0

    def forwardAB(self, payload):
        self.framesAB += 1
        self.bytesAB += len(payload)
        if not self.b.sendFrame(self.channelB, payload):
            self.droppedAB += 1

    def forwardBA(self, payload):
        self.framesBA += 1
        self.bytesBA += len(payload)
        if not self.a.sendFrame(self.channelA, payload):
            self.droppedBA += 1

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
    Sessions given to the relay have C{routes} and C{links} dicts, a
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
        a.routes[channelA] = link.forwardAB
        b.routes[channelB] = link.forwardBA
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
            session.routes.pop(channel, None)
            if session in notify:
                session.channelUnlinked(channel, reason)

    def dropSession(self, session, reason):
        """A session went away: unlink all its links, telling the other ends."""
        for link in list(session.links.values()):
            others = tuple(s for s in (link.a, link.b) if s is not session)
            self.unlink(link, reason, notify=others)
