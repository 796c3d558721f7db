"""
What `pip install .` gives a user: the three twistd plugins, the console
scripts and the schema files, from a wheel built out of this tree.
"""

import configparser
import glob
import os
import subprocess
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DISCOVER = """
import sys
import twisted.plugins
from twisted.plugin import getPlugins
from twisted.application.service import IServiceMaker
twisted.plugins.__path__[:] = [sys.argv[1]]
names = sorted(p.tapname for p in getPlugins(IServiceMaker, twisted.plugins))
print(" ".join(n for n in names if n.startswith("cpushare")))
print("imported cpushare:", any(m == "cpushare" or m.startswith("cpushare.") for m in sys.modules))
"""


def test_the_wheel_holds_plugins_scripts_and_schema(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
         "--no-build-isolation", "-w", str(tmp_path), REPO],
        check=True, capture_output=True,
    )
    [wheel] = glob.glob(str(tmp_path / "cpushare-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(site)
    assert "twisted/plugins/cpushare_plugins.py" in names
    assert "twisted/__init__.py" not in names, "must not shadow Twisted"
    assert "twisted/plugins/__init__.py" not in names, "must not shadow Twisted's plugins"
    assert "cpushare/server/db/schema/001_accounts.sql" in names
    assert "cpushare/server/site/templates/base.html" in names
    assert "cpushare/server/site/static/site.css" in names
    for package in ("cpushare/server/market/", "cpushare/server/money/", "cpushare/server/db/",
                    "cpushare/client/seller/", "cpushare/client/buyer/", "cpushare/client/cli/",
                    "cpushare/vm/", "cpushare/protocol/"):
        assert package + "__init__.py" in names

    [entryPoints] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    config = configparser.ConfigParser()
    config.read_string((site / entryPoints).read_text())
    assert dict(config["console_scripts"]) == {
        "cpushare": "cpushare.client.cli.main:main",
        "cpushare-admin": "cpushare.server.admin:main",
    }

    # Plugin discovery from the installed file alone finds all three, and
    # does not import cpushare (twistd --help must stay cheap).
    out = subprocess.run(
        [sys.executable, "-c", DISCOVER, str(site / "twisted" / "plugins")],
        check=True, capture_output=True, text=True, cwd=str(tmp_path),
    ).stdout.splitlines()
    assert out == ["cpushare-buyer cpushare-seller cpushare-server", "imported cpushare: False"]


def test_twistd_help_lists_the_three_programs():
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    out = subprocess.run([twistd, "--help"], check=True, capture_output=True, text=True).stdout
    for name in ("cpushare-server", "cpushare-seller", "cpushare-buyer"):
        assert name in out
