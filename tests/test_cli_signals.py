"""SIGTERM while a `clipcap` command runs: a SystemExit, so that the command's cleanups run (see test_convert.py for
a conversion ended so in a real process), only where the signal has its default action and only from the main
thread."""

import signal
import threading

import pytest

import clipcap_hf.commands.convert as convert_command
from clipcap_hf.commands import main

ARGUMENTS = ["convert-original", "release.pt", "--output", "out"]


@pytest.fixture
def default_sigterm():
    """SIGTERM's default action for the test, whatever the test runner set, and the runner's back afterwards."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_during_a_command_is_a_system_exit_after_which_the_default_is_back(monkeypatch, default_sigterm):
    cleaned_up = []

    def command(args):
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler), f"SIGTERM would end the process on the spot ({handler})"
        try:
            handler(signal.SIGTERM, None)  # as Python calls it when the signal arrives
        finally:
            cleaned_up.append(signal.getsignal(signal.SIGTERM))

    monkeypatch.setattr(convert_command, "run", command)
    with pytest.raises(SystemExit) as stop:
        main(ARGUMENTS)
    assert stop.value.code == 143  # 128 + SIGTERM, as a shell reports a process the signal ended
    assert cleaned_up == [signal.SIG_DFL]  # a second SIGTERM, during the cleanups, ends the process at once
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_command_that_ends_leaves_sigterm_s_default(monkeypatch, default_sigterm):
    monkeypatch.setattr(convert_command, "run", lambda args: 0)
    assert main(ARGUMENTS) == 0
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_sigterm_handler_of_the_calling_program_is_kept(monkeypatch, default_sigterm):
    def own_handler(signum, frame):
        pass

    seen = []
    monkeypatch.setattr(convert_command, "run", lambda args: seen.append(signal.getsignal(signal.SIGTERM)) or 0)
    for handler in (own_handler, signal.SIG_IGN):
        signal.signal(signal.SIGTERM, handler)
        assert main(ARGUMENTS) == 0
        assert seen.pop() == handler and signal.getsignal(signal.SIGTERM) == handler


def test_a_command_run_from_another_thread_leaves_sigterm_alone(monkeypatch, default_sigterm):
    # Only the main thread may set handlers (signal.signal raises ValueError elsewhere).
    seen, results = [], []
    monkeypatch.setattr(convert_command, "run", lambda args: seen.append(signal.getsignal(signal.SIGTERM)) or 0)
    thread = threading.Thread(target=lambda: results.append(main(ARGUMENTS)))
    thread.start()
    thread.join()
    assert results == [0] and seen == [signal.SIG_DFL]


def test_a_process_of_a_distributed_run_keeps_sigterm_s_default(monkeypatch, default_sigterm):
    # One waiting for its peers in a collective would not run a handler: the launcher's SIGTERM must end it.
    seen = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(convert_command, "run", lambda args: seen.append(signal.getsignal(signal.SIGTERM)) or 0)
    assert main(ARGUMENTS) == 0
    assert seen == [signal.SIG_DFL]
