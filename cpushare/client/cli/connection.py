"""
A command's connection to the market: connect with the home's
credentials, call, turn failures into one-line CommandErrors, close.
"""

from cpushare.client.session import connectOnce, explain, homeEndpoint


class CommandError(Exception):
    """A user-facing failure of a command."""


def call(session, command, host, port, **kw):
    d = session.control.callRemote(command, **kw)

    def fail(failure):
        raise CommandError(explain(failure, host, port))

    return d.addErrback(fail)


async def close(session):
    """Close the session cleanly and wait until it is closed."""
    if session.connected:
        session.transport.loseConnection()
        await session.whenLost()


async def connectHome(reactor, home, role="cli"):
    host, port = home.server
    session = await connectOnce(
        reactor, homeEndpoint(reactor, home), role, host=host, port=port
    )
    return session, host, port


class Connection:
    """
    A command's connection to the market: C{async with Connection(reactor,
    home) as market:}, then C{await market.call(Command, ...)}; failures
    become one-line CommandErrors, and the connection is closed at the end.
    """

    def __init__(self, reactor, home):
        self.reactor = reactor
        self.home = home
        self.session = None

    async def __aenter__(self):
        self.session, self.host, self.port = await connectHome(self.reactor, self.home)
        return self

    async def __aexit__(self, *exc):
        await close(self.session)

    def call(self, command, **kw):
        return call(self.session, command, self.host, self.port, **kw)

    async def every(self, command, name, key, cursor, **kw):
        """
        All the entries of the paged list C{name} that C{command} answers
        with, page after page: each next page is asked for with C{cursor}
        set to the C{key} of the last entry so far, until C{more} is false.
        """
        found = []
        while True:
            page = await self.call(command, **kw)
            found.extend(page[name])
            if not page["more"] or not page[name]:
                return found
            kw[cursor] = page[name][-1][key]
