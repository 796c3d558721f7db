"""Typing piped input into a VM's console, on a fake clock."""

from twisted.internet.task import Clock

from cpushare.client.cli.vms import PipedTyping


def test_lines_are_typed_one_prompt_at_a_time():
    clock = Clock()
    typed = []
    typing = PipedTyping(clock, typed.append)
    typing.output(b"boot messages\r\ncpushare:/# \x1b[6n")
    typing.input(b"echo one\necho t")
    assert typed == [b"echo one\n"]
    typing.input(b"wo\n")
    typing.inputEnded()
    typing.output(b"echo one\r\none\r\n")
    assert typed == [b"echo one\n"], "not before the next prompt"
    typing.output(b"cpushare:/# \x1b[")
    typing.output(b"6n")
    assert typed == [b"echo one\n", b"echo two\n"]
    assert typing.typed.called


def test_a_guest_that_shows_no_prompt_marker_gets_lines_after_a_quiet_second():
    clock = Clock()
    typed = []
    typing = PipedTyping(clock, typed.append)
    typing.input(b"first\nsecond\n")
    assert typed == []
    clock.advance(PipedTyping.QUIET)
    assert typed == [b"first\n"]
    typing.output(b"output of first\r\n$ ")
    clock.advance(PipedTyping.QUIET / 2)
    typing.output(b"more")
    clock.advance(PipedTyping.QUIET / 2)
    assert typed == [b"first\n"], "output keeps it waiting"
    clock.advance(PipedTyping.QUIET)
    assert typed == [b"first\n", b"second\n"]
