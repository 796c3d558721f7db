"""
The states of a VM, and the one table of the moves between them.

A VM of an order waits (C{pending}) until the market places it on a seller
(C{allocated}); the seller fetches its image (C{fetching}), boots it
(C{booting}) and runs it (C{running}).  A placed VM whose seller's
connection is gone is C{detached} until the seller comes back (C{running}
again) or its grace period ends (C{pending}, to be placed anew).  It ends
C{stopped}, C{failed} or C{lost}, and never moves again.  Each stay of a VM
on one seller is a lease: it opens when the VM is allocated and ends when
the VM leaves that seller (back to pending, or ended).

The values are the strings on the wire (C{VMState}, C{ListVMs}) and in the
database, so C{VMState.RUNNING == "running"}.  Both the server and the
seller move a VM only with L{VMLife.moveTo}, which refuses any move the
table does not hold with L{IllegalTransition}; the caller logs it in one
line and carries on.
"""

import enum


class VMState(enum.StrEnum):
    PENDING = "pending"
    ALLOCATED = "allocated"
    FETCHING = "fetching"
    BOOTING = "booting"
    RUNNING = "running"
    DETACHED = "detached"
    STOPPED = "stopped"
    FAILED = "failed"
    LOST = "lost"


class OrderState(enum.StrEnum):
    OPEN = "open"
    DONE = "done"           # the market's own order (a CPU benchmark) is over
    CANCELLED = "cancelled"


# The states a VM ends in.
OVER = frozenset({VMState.STOPPED, VMState.FAILED, VMState.LOST})
# The states of a VM that is not over: the server loads these back after a restart.
ACTIVE = tuple(state for state in VMState if state not in OVER)
# The states a seller may report in VMState (allocated and lost are
# accepted, though a seller never needs them).
REPORTED = frozenset({VMState.ALLOCATED, VMState.FETCHING, VMState.BOOTING, VMState.RUNNING,
                      VMState.STOPPED, VMState.FAILED, VMState.LOST})

# state -> the states it may move to.  Booting goes forward only, though a
# step may be skipped (a seller need not report every one); any placed VM
# may leave its seller (pending) or end; a detached one comes back running.
TRANSITIONS = {
    VMState.PENDING: frozenset({VMState.ALLOCATED, VMState.STOPPED}),
    VMState.ALLOCATED: frozenset({VMState.FETCHING, VMState.BOOTING, VMState.RUNNING,
                                  VMState.PENDING, VMState.DETACHED}) | OVER,
    VMState.FETCHING: frozenset({VMState.BOOTING, VMState.RUNNING,
                                 VMState.PENDING, VMState.DETACHED}) | OVER,
    VMState.BOOTING: frozenset({VMState.RUNNING, VMState.PENDING, VMState.DETACHED}) | OVER,
    VMState.RUNNING: frozenset({VMState.PENDING, VMState.DETACHED}) | OVER,
    VMState.DETACHED: frozenset({VMState.RUNNING, VMState.PENDING}) | OVER,
    VMState.STOPPED: frozenset(),
    VMState.FAILED: frozenset(),
    VMState.LOST: frozenset(),
}


class IllegalTransition(Exception):
    """A move the table does not hold; its message names the VM, from and to."""

    def __init__(self, vm, old, new):
        Exception.__init__(self, f"VM {vm} cannot go from {old} to {new}")
        self.vm = vm
        self.old = old
        self.new = new


def check(vm, old, new):
    """Raise L{IllegalTransition} unless VM C{vm} may move from C{old} to C{new}."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(vm, old, new)


class VMLife:
    """
    Mixin for a VM (with an C{id}) whose C{state} changes only along
    TRANSITIONS.  Staying in the same state (a periodic report) is no move.
    """

    def __init__(self, state=VMState.PENDING):
        self._state = VMState(state)

    @property
    def state(self):
        return self._state

    def moveTo(self, new):
        """Move to C{new}, or raise L{IllegalTransition} and stay where it is."""
        new = VMState(new)
        check(self.id, self._state, new)
        self._state = new
