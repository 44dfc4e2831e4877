"""A signal whose `Interrupted` a C extension catches and replaces with an error of its own
(safetensors does when SIGTERM lands mid-read) still ends the command as the signal: 143/130 and
"no output was written", not exit 2 naming a tensor or an internal error."""

from __future__ import annotations

import os
import signal
import time

import pytest
import typer

from rotfuse.cli.common import run_command
from rotfuse.core import signals
from rotfuse.core.errors import InputError


@pytest.mark.parametrize(
    "mangled",
    [
        TypeError("could not determine the shape of object type 'torch.storage.UntypedStorage'"),
        InputError("model.safetensors: cannot read tensor 'x' (could not determine the shape ...)"),
        OSError(5, "Input/output error"),
    ],
    ids=["internal", "input", "os"],
)
@pytest.mark.parametrize(
    ("sig", "code", "verb"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_a_signal_turned_into_another_error_exits_as_the_signal(capsys, mangled, sig, code, verb):
    signals.reset()

    def action() -> None:
        try:
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler raises `Interrupted` here, as it would inside a read
        except BaseException:  # what an extension's own error handling makes of it
            raise mangled from None

    with pytest.raises(typer.Exit) as info:
        run_command(action, debug=False)
    assert info.value.exit_code == code
    assert capsys.readouterr().err == f"rotfuse: {verb}; no output was written\n"


def test_without_a_signal_the_error_is_itself(capsys):
    signals.reset()

    def action() -> None:
        raise InputError("model.safetensors: cannot read tensor 'x' (truncated)")

    with pytest.raises(typer.Exit) as info:
        run_command(action, debug=False)
    assert info.value.exit_code == 2
    assert capsys.readouterr().err == "rotfuse: error: model.safetensors: cannot read tensor 'x' (truncated)\n"
