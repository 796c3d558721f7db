"""
The command lines of the web site: `cpushare web [password]` and
`cpushare-admin web-admin NAME`.
"""

import io

import pytest

from cpushare.client.cli import web
from cpushare.client.cli.connection import CommandError
from cpushare.client.cli.main import parser
from cpushare.server import admin
from cpushare.server.db import store


def test_the_web_commands_parse():
    args = parser().parse_args(["web"])
    assert args.run is web.link and not args.no_open
    assert parser().parse_args(["web", "--no-open"]).no_open
    assert parser().parse_args(["web", "password"]).run is web.password


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_password_is_one_line_of_piped_input_or_typed_twice(monkeypatch):
    assert web.readPassword(io.StringIO("a long password\r\nnext line\n")) == \
        "a long password"
    typed = iter(["a long password", "a long password"])
    monkeypatch.setattr(web.getpass, "getpass", lambda prompt: next(typed))
    assert web.readPassword(Terminal()) == "a long password"
    typed = iter(["a long password", "a long passwore"])
    with pytest.raises(CommandError, match="the two passwords differ"):
        web.readPassword(Terminal())


def test_the_operator_makes_an_account_a_web_administrator(tmp_path, capsys):
    conn = store.connect(str(tmp_path / "market.sqlite"))
    store.transact(conn, store.migrate)
    store.transact(conn, store.createAccount, "alice", "fp")

    def flag():
        return conn.transact(lambda c: c.execute(
            "SELECT web_admin FROM accounts WHERE name = 'alice'").fetchone()[0])

    assert admin.main(["--data", str(tmp_path), "web-admin", "alice"]) == 0
    assert flag() == 1
    assert "alice is an administrator of the web site" in capsys.readouterr().out
    assert admin.main(["--data", str(tmp_path), "web-admin", "alice", "--remove"]) == 0
    assert flag() == 0
    assert admin.main(["--data", str(tmp_path), "web-admin", "nobody"]) == 1
    assert "no account named 'nobody'" in capsys.readouterr().err
    conn.close()


def test_the_servers_trusted_proxies_are_addresses(tmp_path):
    from twisted.python import usage

    from cpushare.server.tap import Options
    options = Options()
    options.parseOptions(["--data", str(tmp_path), "--web-proxy", "192.0.2.1, ::1"])
    assert options["web-proxy"] == ["192.0.2.1", "::1"]
    default = Options()
    default.parseOptions(["--data", str(tmp_path)])
    assert default["web-proxy"] == []
    with pytest.raises(usage.UsageError, match="--web-proxy 'proxy.example': not an IP"):
        Options().parseOptions(["--data", str(tmp_path), "--web-proxy", "proxy.example"])
