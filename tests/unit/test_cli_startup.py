"""The `codistill-ds` entry point registers only the command it runs: `train --nproc N` is a
parent that starts torchrun and waits, `lighthouse` and `retire` talk to a server; none of them
should spend a second or more importing torch before doing so (each rank imports it anyway)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from codistill_ds.cli import COMMANDS, build_parser, command_of
from codistill_ds.distributed.launching import REPO

HEAVY = "sorted(m for m in ('torch', 'deepspeed', 'transformers') if m in sys.modules)"


def run_python(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.split("\n")[:-1]


def test_train_nproc_starts_torchrun_without_importing_torch():
    """The whole `main` path up to starting torchrun (which is caught here and not run)."""
    code = ("import subprocess, sys; from codistill_ds import cli; "
            f"subprocess.call = lambda cmd: print(cmd[2], {HEAVY}) or 0; "
            "sys.exit(cli.main(['train', '--nproc', '4', '--config', 'x.yaml']))")
    assert run_python(code) == ["torch.distributed.run []"]


@pytest.mark.parametrize("argv", [["lighthouse", "--port", "1"], ["retire", "runs/g2"], ["plot", "runs/demo"]])
def test_commands_that_need_no_torch_parse_without_it(argv):
    code = f"import sys; from codistill_ds import cli; cli.build_parser(cli.command_of({argv!r})).parse_args({argv!r}); print({HEAVY})"
    assert run_python(code) == ["[]"]


def test_the_full_parser_still_lists_every_command():
    assert command_of(["--help"]) is None and command_of([]) is None
    assert command_of(["--local_rank=1", "train", "--config", "plan"]) == "train"
    helptext = build_parser().format_help()
    assert all(name in helptext for name in COMMANDS)
    for name in COMMANDS:  # each command's parser registers that command alone
        assert [c for c in COMMANDS if f"{{{c}}}" in build_parser(name).format_usage()] == [name]
