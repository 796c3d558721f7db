"""
The replay window of one direction of a pair (RFC 6479, as WireGuard keeps it).

A ring of 64-bit words holds one bit a counter; moving the window forward
clears whole words instead of shifting the bitmap, so accepting a counter
costs the same however far it jumps.  Every counter within L{WINDOW} of the
highest one seen is accepted once, in any order; an older one, or one seen
before, is refused.  The caller checks a counter only after the datagram that
carries it authenticated, so a forger cannot move the window.
"""

BLOCK_BITS = 64
#: How many counters behind the highest one seen are still accepted once.
WINDOW = 2048
#: Words in the ring: the window plus the word being filled.
RING_BLOCKS = WINDOW // BLOCK_BITS + 1
#: Counters from here on are never accepted (the sender must rekey first).
LIMIT = 2 ** 64 - 1

REPLAYED = "replayed"
TOO_OLD = "too old"


class ReplayWindow:
    """Which counters of one direction were already accepted."""

    def __init__(self):
        self.ring = [0] * RING_BLOCKS
        self.highest = 0

    def accept(self, counter):
        """
        Record C{counter} and return None when it is new and recent enough;
        else return why it is refused (L{REPLAYED} or L{TOO_OLD}) and change
        nothing.
        """
        if not 0 <= counter < LIMIT:
            return TOO_OLD
        block = counter // BLOCK_BITS
        if counter > self.highest:
            current = self.highest // BLOCK_BITS
            for i in range(current + 1, current + 1 + min(block - current, RING_BLOCKS)):
                self.ring[i % RING_BLOCKS] = 0
            self.highest = counter
        elif self.highest - counter > WINDOW:
            return TOO_OLD
        index = block % RING_BLOCKS
        bit = 1 << (counter % BLOCK_BITS)
        if self.ring[index] & bit:
            return REPLAYED
        self.ring[index] |= bit
        return None
