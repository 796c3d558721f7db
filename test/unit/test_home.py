"""Client home folders and server addresses."""

import pytest

from cpushare.client.home import Home, HomeError, parseServer


@pytest.mark.parametrize("text, expected", [
    ("market.example:7444", ("market.example", 7444)),
    ("market.example", ("market.example", 7444)),
    ("127.0.0.1:9", ("127.0.0.1", 9)),
    ("[::1]:8000", ("::1", 8000)),
    ("[::1]", ("::1", 7444)),
])
def test_server_addresses(text, expected):
    assert parseServer(text) == expected


@pytest.mark.parametrize("text", ["host:port", ":7444", "host:0", "host:70000", "[::1]:x"])
def test_bad_server_addresses_name_the_problem(text):
    with pytest.raises(HomeError, match="server address"):
        parseServer(text)


def test_an_empty_home_says_to_register(tmp_path):
    home = Home(str(tmp_path / "h"))
    assert not home.exists()
    with pytest.raises(HomeError, match="register first"):
        home.credentials()


def test_the_key_is_made_once(tmp_path):
    home = Home(str(tmp_path / "h"))
    key = home.prepareKey()
    again = home.prepareKey()
    assert key.private_numbers() == again.private_numbers()
