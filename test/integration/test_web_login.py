"""
Logging in to the web site of a real cpushare-server (--web on loopback)
with the CLI's password and one-time link, over HTTPS checked against the
market's CA: the wiring of tap.py, web.py and the site, end to end.
"""

import http.client
import json
import re
import ssl
import urllib.parse

from .conftest import LOOPBACK, Market, assertOneLineError, cpushare

PASSWORD = "a password long enough"


class HTTPS:
    """Requests to the market's web port, trusting only its CA, keeping cookies."""

    def __init__(self, market):
        web = json.loads((market.data / "web.address").read_text())
        self.port = web["port"]
        self.context = ssl.create_default_context(cafile=str(market.ca))
        # Loopback's address, and the market's certificate for its --hostname
        # (localhost): the chain is still checked against the market's CA.
        self.context.check_hostname = False
        self.cookies = {}

    def request(self, method, path, fields=None):
        connection = http.client.HTTPSConnection(LOOPBACK, self.port, context=self.context,
                                                 timeout=30)
        headers = {"Host": f"localhost:{self.port}"}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if fields is not None:
            body = urllib.parse.urlencode(fields)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        connection.request(method, path, body, headers)
        response = connection.getresponse()
        text = response.read().decode("utf-8")
        for cookie in response.headers.get_all("Set-Cookie") or ():
            name, _, value = cookie.split(";")[0].partition("=")
            self.cookies[name] = value
        connection.close()
        return response.status, response.headers, text


def test_the_cli_sets_a_password_and_opens_a_one_time_link(processes, tmp_path):
    market = Market(processes, tmp_path / "market",
                    extra=["--web", f"tcp:0:interface={LOOPBACK}"]).start()
    home = market.register(tmp_path / "alice", "alice", funds=None)

    assertOneLineError(cpushare(home, "web", "password", input="too short\n"),
                       "too short: at least 10 characters")
    done = cpushare(home, "web", "password", input=PASSWORD + "\n")
    assert done.status == 0, done
    done = cpushare(home, "web", "--no-open")
    assert done.status == 0, done
    [link] = re.findall(r"https://\S+", done.stdout)
    assert link.startswith("https://localhost:"), link

    https = HTTPS(market)
    path = urllib.parse.urlsplit(link).path
    # The link's page names the account; its button logs in.
    status, headers, page = https.request("GET", path)
    assert status == 200 and "logs this browser in as <strong>alice</strong>" in page, page
    token = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    status, headers, _ = https.request("POST", path, {"csrf": token})
    assert (status, headers["Location"]) == (303, "/"), headers
    status, headers, page = https.request("GET", "/")
    assert status == 200 and "alice" in page, page
    assert headers["Strict-Transport-Security"].startswith("max-age=")
    status, _, page = https.request("GET", "/static/site.css")
    assert status == 200
    # The link is spent; the password logs in.
    stranger = HTTPS(market)
    assert stranger.request("GET", path)[0] == 403
    _, _, form = stranger.request("GET", "/login")
    token = re.search(r'name="csrf" value="([^"]+)"', form).group(1)
    status, headers, _ = stranger.request(
        "POST", "/login", {"name": "alice", "password": PASSWORD, "csrf": token})
    assert status == 303, headers
    assert "alice" in stranger.request("GET", "/vms")[2]
