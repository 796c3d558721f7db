"""
The market server on PostgreSQL (`--db postgresql://...`): it starts, a
client registers and is let in, the admin tool reads the same database;
and a database it cannot reach stops it at once with one line.
"""

import psycopg

from cpushare.server.db.database import masked

from .conftest import START_TIMEOUT, Market, cpushare, executable


def test_a_market_on_postgresql_registers_and_admits_clients(processes, tmp_path, postgresURL):
    market = Market(processes, tmp_path / "market", db=postgresURL).start()
    home = market.register(tmp_path / "alice", "alice")
    # Being let in takes the account found by its certificate, in PostgreSQL.
    result = cpushare(home, "sellers", "--json")
    assert result.status == 0, result
    assert result.json() == []

    accounts = market.admin("accounts")
    assert accounts.status == 0, accounts
    assert "alice" in accounts.stdout and "active" in accounts.stdout
    assert not (tmp_path / "market" / "market.sqlite").exists()
    market.waitForLog(f"database {masked(postgresURL)}: applied schema versions")
    password = psycopg.conninfo.conninfo_to_dict(postgresURL).get("password")
    if password:
        assert password not in market.log()
    market.stop()


def test_a_database_that_cannot_be_reached_stops_the_server_with_one_line(processes, tmp_path):
    url = "postgresql://cpushare:s3cret@127.0.0.1:1/market"
    server = processes.start("server", [
        executable("twistd"), "-n", "--pidfile=", "cpushare-server",
        "--data", tmp_path / "market", "--listen", "tcp:0:interface=127.0.0.1", "--db", url,
    ])
    status = server.popen.wait(START_TIMEOUT)
    output = server.log()
    assert status == 1, server.describe()
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith(
        "cpushare-server: cannot connect to the database"
        " postgresql://cpushare:***@127.0.0.1:1/market: "), output
    assert "Connection refused" in lines[0], output
