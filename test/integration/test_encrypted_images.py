"""
`cpushare image upload --encrypt` through the real server and CLI: the key
stays in the buyer's home (0600) and reaches the market only sealed, the
listing says which images are encrypted, and such an image is ordered only
as a trusted order; another account cannot give it a key.
"""

import json
import os
import shutil
import stat

from test.unit.livecdfakes import otherISO

from .conftest import assertOneLineError, cpushare


def test_an_encrypted_upload_keeps_the_key_and_refuses_untrusted_orders(market, tmp_path):
    bob = market.register(tmp_path / "bob", "bob")
    iso = tmp_path / "job.iso"
    otherISO(str(iso))
    uploaded = cpushare(bob, "image", "upload", "--encrypt", iso)
    assert uploaded.status == 0, uploaded
    first, second = uploaded.stdout.splitlines()
    assert first.startswith(f"uploaded {iso} encrypted: "), uploaded
    sha256 = first.rsplit("sha256 ", 1)[1]
    keyFile = bob / "image-keys" / f"{sha256}.key"
    assert str(keyFile) in second and "order it with --trusted" in second, uploaded
    assert stat.S_IMODE(os.stat(keyFile).st_mode) == 0o600
    key = keyFile.read_text().strip()
    assert len(bytes.fromhex(key)) == 32
    # Only the ciphertext is on the market; the key sealed, never logged.
    assert (market.data / "images" / f"{sha256}.iso").read_bytes() != iso.read_bytes()
    assert stat.S_IMODE(os.stat(market.data / "image-keys.kek").st_mode) == 0o600
    assert key not in market.log()

    listed = cpushare(bob, "image", "list", "--json").json()
    assert [(i["sha256"], i["encrypted"]) for i in listed] == [(sha256, True)]
    table = cpushare(bob, "image", "list")
    assert "ENCRYPTED" in table.stdout and table.stdout.rstrip().endswith("yes"), table

    refused = cpushare(bob, "order", "place", "--image", sha256, "--vms", "1")
    assertOneLineError(refused, f"image {sha256} is encrypted", "order it with --trusted")

    again = cpushare(bob, "image", "key", sha256)
    assert again.status == 0 and f"holds the key of image {sha256}" in again.stdout, again

    mallory = market.register(tmp_path / "mallory", "mallory")
    (mallory / "image-keys").mkdir()
    shutil.copy(keyFile, mallory / "image-keys")
    stolen = cpushare(mallory, "image", "key", sha256)
    assertOneLineError(stolen, f"you have no image {sha256}")
    missing = cpushare(mallory, "image", "key", "a" * 64)
    assertOneLineError(missing, f"no key for image {'a' * 64} in this home")
    assert json.loads(cpushare(mallory, "image", "list", "--json").stdout) == []
