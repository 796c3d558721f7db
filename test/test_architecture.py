"""
The import rules of docs/architecture.md, as import-linter contracts in
pyproject.toml: they hold for the tree, and a forbidden import breaks them.
"""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"


def lint(tree):
    return subprocess.run(
        [str(LINT), "--config", str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True,
    )


def copyTree(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "cpushare", tree / "cpushare",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree)
    return tree


def test_the_tree_keeps_every_import_rule():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_forbidden_import_breaks_a_rule(tmp_path):
    tree = copyTree(tmp_path)
    assert lint(tree).returncode == 0
    cases = [
        ("cpushare/protocol/mux.py", "cpushare.server.relay",
         "The core (protocol, pki, money, images, vm, attest, mesh) imports no program"),
        ("cpushare/attest/evidence.py", "cpushare.server.market.orders",
         "The core (protocol, pki, money, images, vm, attest, mesh) imports no program"),
        ("cpushare/mesh/path.py", "cpushare.client.seller.vmhost",
         "The core (protocol, pki, money, images, vm, attest, mesh) imports no program"),
        ("cpushare/client/seller/vmhost.py", "cpushare.client.buyer.switch",
         "The seller, the buyer and the command line are apart"),
        ("cpushare/server/db/store.py", "cpushare.server.money.ledger",
         "The server in layers: front ends, market, money, store"),
        ("cpushare/client/session.py", "cpushare.server.db.store",
         "The market server and the client programs never import each other"),
        ("cpushare/server/admin.py", "cpushare.server.site.app",
         "The web site is reached only through the web port (tap and web)"),
        ("cpushare/server/site/auth.py", "cpushare.server.session",
         "The server in layers: front ends, market, money, store"),
    ]
    for path, module, contract in cases:
        source = tree / path
        original = source.read_text()
        source.write_text(original + f"\nimport {module}  # noqa\n")
        try:
            result = lint(tree)
        finally:
            source.write_text(original)
        assert result.returncode != 0, (path, module)
        assert f"{contract} BROKEN" in result.stdout, result.stdout
