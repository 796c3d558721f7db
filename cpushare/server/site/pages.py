"""
What the site's page modules share: times as pages show them, and API
calls whose refusal becomes a message on the page (never a traceback).
"""

import datetime

from twisted.logger import Logger

from cpushare.server.site import api

log = Logger()


def when(value):
    """A time as the pages show it: epoch seconds or ISO text as 'YYYY-MM-DD HH:MM UTC'."""
    if value is None or value == "":
        return ""
    try:
        if isinstance(value, (int, float)):
            moment = datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
        else:
            moment = datetime.datetime.fromisoformat(str(value))
    except (ValueError, OverflowError, OSError):
        return str(value)[:40]
    return moment.strftime("%Y-%m-%d %H:%M UTC")


async def refusalOf(call):
    """(answer, None) of an awaited API call, or (None, (status, message)) when refused."""
    try:
        return await call, None
    except Exception as error:
        status, answer = api.refusal(error)
        if status == 500:
            log.failure("a page's API call failed")
        return None, (status, answer["error"])


async def pageFrom(market, account, function, cursor, value):
    """
    A page of the API list C{function} from the cursor argument C{cursor}
    given as C{value} (a query's field; None: the first page): (answer,
    None), or for a value it refuses, (the first page, (status, message)).
    """
    answer, refused = await refusalOf(api.call(
        market, account, function, {} if value is None else {cursor: value}))
    if refused is not None:
        answer = await api.call(market, account, function)
    return answer, refused
