"""Stop signals on the command line: Ctrl-C and SIGTERM end every command with one line, from its first moment."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import pyramidflow.cli as cli

REPO = Path(cli.__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_importing_the_command_line_loads_no_torch():
    """The stop-signal handling of ``main`` must be in place before torch: so torch must not come with the module."""
    done = _python("import sys, pyramidflow.cli; print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# A stop signal that arrives while the command imports torch, at a fixed point: when torch is looked up.
_STOP_DURING_IMPORTS = """
import signal, sys

class StopWhenTorchIsImported:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            signal.raise_signal(signal.{signal})
        return None

sys.meta_path.insert(0, StopWhenTorchIsImported())
from pyramidflow.cli import main
sys.exit(main(["plan", "--size", "64"]))
"""


@pytest.mark.parametrize("name, status, line", [
    ("SIGINT", 130, "error: interrupted"),
    ("SIGTERM", 143, "error: terminated (SIGTERM)"),
])
def test_a_stop_during_the_imports_is_one_line_and_the_signals_status(name, status, line):
    done = _python(_STOP_DURING_IMPORTS.format(signal=name))
    assert (done.returncode, done.stderr, done.stdout) == (status, line + "\n", "")


def test_an_interrupt_swallowed_during_the_imports_still_stops_the_command(monkeypatch, capsys):
    """Code that catches every exception (some import machinery does) must not turn Ctrl-C into a full run."""
    real_parser, ran = cli.build_parser, []

    def parser_whose_imports_swallow_ctrl_c():
        try:
            signal.raise_signal(signal.SIGINT)
        except BaseException:
            pass
        return real_parser()

    monkeypatch.setattr(cli, "build_parser", parser_whose_imports_swallow_ctrl_c)
    monkeypatch.setitem(cli._COMMANDS, "plan", ran.append)
    assert cli.main(["plan", "--size", "64"]) == 130
    assert ran == [] and capsys.readouterr().err == "error: interrupted\n"


def test_sigterm_during_any_command_is_one_line_and_143():
    """In a child process: where SIGTERM is not handled, it would end the test run itself."""
    done = _python(
        "import signal, sys\n"
        "import pyramidflow.cli as cli\n"
        "cli._COMMANDS['synth'] = lambda args: signal.raise_signal(signal.SIGTERM)\n"
        "status = cli.main(['synth', '--out', 'unused'])\n"
        "assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, 'the handler outlives the command'\n"
        "sys.exit(status)\n"
    )
    assert (done.returncode, done.stderr) == (143, "error: terminated (SIGTERM)\n")
