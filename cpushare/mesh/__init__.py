"""
The direct mesh between sellers: the secure datagram path that carries one
buyer network's frames from one seller's client to another's over UDP, as a
library with no sockets (docs/protocol.md, "The direct path between sellers").

  wire.py    the datagram format, the keys of a pair, sealing and opening
  replay.py  the replay window checked after a datagram authenticates
  path.py    one direct path to a peer on a clock: hole punching, keepalives,
             its state (trying, direct, relayed), RTT and byte counts
"""
