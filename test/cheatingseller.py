"""
A cheating seller, for tests only (never a product option): the seller's
twistd plugin run in a process whose result port alters every VM's
result, flipping the lowest bit of each byte before it is hashed and
passed on.  Its VMs run as an honest seller's do; only what they send
as their result is wrong, as a seller's would be that skips the work and
makes up an answer.

    python test/cheatingseller.py -n --pidfile= cpushare-seller --home HOME ...

takes twistd's arguments; L{TWISTD} is the command to put before them
(in place of the virtualenv's twistd), as the real-VM tests do.
"""

import os
import sys

# Run as a script: the project's root is where its packages are found.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TWISTD = [sys.executable, os.path.abspath(__file__)]


def altered(data):
    """What the cheater sends instead of C{data}: each byte's lowest bit flipped."""
    return bytes(b ^ 1 for b in data)


def cheatingResultPort():
    """The seller's result port, made to alter every result's bytes."""
    from cpushare.client.seller.results import ResultPort

    class CheatingResultPort(ResultPort):
        def dataReceived(self, data):
            if self.size is not None:
                data = altered(data)
            ResultPort.dataReceived(self, data)

        def _readHeader(self, data):
            rest = ResultPort._readHeader(self, data)
            return None if rest is None else altered(rest)

    return CheatingResultPort


def main(argv):
    # Not this file's folder (the tests' modules) but the project's root.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, ROOT)
    from cpushare.client.seller import vmhost
    from twisted.scripts.twistd import run

    vmhost.ResultPort = cheatingResultPort()
    print("test/cheatingseller.py: this seller alters every VM's result", flush=True)
    sys.argv = ["twistd"] + argv
    run()


if __name__ == "__main__":
    main(sys.argv[1:])
