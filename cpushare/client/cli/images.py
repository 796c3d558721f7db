"""
The image commands: build a livecd, upload an ISO, list the market's images.

    cpushare image build -o job.iso [--add DIR]... [--ssh-key KEY.pub]... [--no-ssh-key]
                         [--base other.iso] [--cache DIR]
    cpushare image upload ISO [--name NAME] [--encrypt]
    cpushare image key SHA256
    cpushare image list [--json]
"""

import os
import sys

from twisted.internet.threads import deferToThreadPool

from cpushare.client.cli import upload
from cpushare.client.cli.connection import CommandError, Connection
from cpushare.client.cli.output import actions, command, formatTable, printListing
from cpushare.protocol import commands


async def imageBuild(reactor, args, home):
    """Build a livecd ISO in a thread: it is big file and CPU work."""
    from cpushare.vm import livecd
    from cpushare.vm.isoimage import ImageError

    def note(message):
        reactor.callFromThread(print, f"  {message}", file=sys.stderr)

    if args.ssh_key and args.no_ssh_key:
        raise CommandError("--ssh-key and --no-ssh-key contradict each other: give one")
    keys = args.ssh_key
    if not keys and not args.no_ssh_key and args.base is None:
        keys = livecd.defaultKeyFiles()
        for path in keys:
            print(f"  adding your ssh key {path} (--no-ssh-key leaves it out)", file=sys.stderr)
    try:
        result = await deferToThreadPool(
            reactor, reactor.getThreadPool(), livecd.build,
            args.output, args.add, args.base, args.cache, note, keys,
        )
    except ImageError as e:
        raise CommandError(str(e))
    for message in result.notes:
        print(f"cpushare: note: {message}", file=sys.stderr)
    print(f"wrote {result.path}: {result.description}")
    print(f"size {result.size / 1e6:.1f} MB, sha256 {result.sha256}")


async def imageUpload(reactor, args, home):
    if not os.path.isfile(args.iso):
        raise CommandError(f"{args.iso} is not a file")
    from cpushare.vm.isoimage import ImageError, checkBootable
    try:
        await deferToThreadPool(reactor, reactor.getThreadPool(), checkBootable, args.iso)
    except ImageError as e:
        raise CommandError(str(e))
    if args.encrypt:
        return await imageUploadEncrypted(reactor, args, home)
    async with Connection(reactor, home) as market:
        bar = upload.ProgressBar(os.path.getsize(args.iso))
        try:
            sha256, size, sent = await upload.upload(
                reactor, market.session, args.iso, args.name, progress=bar.update)
        except commands.CPUShareError as e:
            raise CommandError(str(e))
        finally:
            bar.close()
    if sent:
        print(f"uploaded {args.iso}: {size} bytes, sha256 {sha256}")
    else:
        print(f"{args.iso} is already on the market (sha256 {sha256}); nothing sent")


async def imageUploadEncrypted(reactor, args, home):
    from cpushare.imagecrypt import ImageCryptError, encryptedSize
    async with Connection(reactor, home) as market:
        bar = upload.ProgressBar(encryptedSize(os.path.getsize(args.iso)))
        try:
            sha256, size, keyFile = await upload.uploadEncrypted(
                reactor, market.session, home.path, args.iso, args.name, progress=bar.update)
        except (commands.CPUShareError, ImageCryptError) as e:
            raise CommandError(str(e))
        finally:
            bar.close()
    print(f"uploaded {args.iso} encrypted: {size} bytes, sha256 {sha256}")
    print(f"its key is in {keyFile}; the market holds it sealed and releases it only to "
          "attested sellers: order it with --trusted")


async def imageKey(reactor, args, home):
    """Give the market again the key kept in the home (after a failed upload --encrypt)."""
    try:
        key = upload.loadKey(home.path, args.sha256)
    except (OSError, ValueError) as e:
        raise CommandError(f"no key for image {args.sha256} in this home: {e}")
    async with Connection(reactor, home) as market:
        try:
            await market.session.control.callRemote(
                commands.SetImageKey, sha256=args.sha256, key=key)
        except commands.CPUShareError as e:
            raise CommandError(str(e))
    print(f"the market holds the key of image {args.sha256}")


async def imageList(reactor, args, home):
    async with Connection(reactor, home) as market:
        listed = await market.every(commands.ListImages, "images", "sha256", "after")
    printListing(args.json, listed, "no images: upload one with 'cpushare image upload ISO'",
                 formatImages)


def formatImages(listed, now):
    rows = [("SHA256", "SIZE", "NAME", "UPLOADED", "ENCRYPTED")]
    rows += [(i["sha256"], f"{i['size'] / 1e6:.1f} MB", i["name"], i["uploaded"],
              "yes" if i.get("encrypted") else "no")
             for i in listed]
    return formatTable(rows)


def addParsers(sub):
    imageActions = actions(sub, "image", "build livecd images")
    b = command(
        imageActions, "build", imageBuild,
        help="build a bootable livecd ISO with your files inside",
        description="Build the reference livecd (a Debian kernel, a busybox system and the "
        "dropbear ssh server) with the files of each --add DIR at /cpushare/ in the guest, "
        "or add them to the bootable ISO --base. At boot the guest starts its ssh server "
        "(root, by public key only), takes an address by DHCP, prints CPUSHARE-READY on its "
        "serial console and runs /cpushare/start if it is executable.",
    )
    b.add_argument("-o", "--output", required=True, metavar="ISO", help="the ISO to write")
    b.add_argument("--add", action="append", default=[], metavar="DIR",
                   help="a folder whose files go to /cpushare/ (repeatable; later ones win)")
    b.add_argument("--ssh-key", action="append", default=[], metavar="FILE",
                   help="an OpenSSH public key file whose keys may log in to the VMs as root "
                   "(repeatable; default: your ~/.ssh/id_*.pub when building a new livecd)")
    b.add_argument("--no-ssh-key", action="store_true",
                   help="put no ssh key in the image, not even your ~/.ssh/id_*.pub")
    b.add_argument("--base", metavar="ISO",
                   help="add the files to this bootable ISO instead of a new reference livecd")
    b.add_argument("--cache", metavar="DIR",
                   help="where the Debian parts are kept (default $CPUSHARE_CACHE, "
                   "else $XDG_CACHE_HOME/cpushare or ~/.cache/cpushare)")
    u = command(imageActions, "upload", imageUpload, help="upload an ISO to the market")
    u.add_argument("iso")
    u.add_argument("--name", help="a name for it (default: the file's name)")
    u.add_argument("--encrypt", action="store_true",
                   help="encrypt it here first: the market and unattested sellers see only "
                   "ciphertext; the key is kept in HOME/image-keys/ and released by the "
                   "market only to attested sellers (order it with --trusted)")
    k = command(imageActions, "key", imageKey,
                help="give the market the key of an encrypted image again, from this home")
    k.add_argument("sha256")
    command(imageActions, "list", imageList, json=True, help="the images on the market")
