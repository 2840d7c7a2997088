"""Logging: the library prints nothing a user did not ask for; the command line's configure_logging routes notes to
stdout and warnings to stderr at the level -q / -v choose."""
import logging
import subprocess
import sys

import pytest

from mae_fast.cli import build_parser
from mae_fast.cli.common import verbosity
from mae_fast.logs import configure_logging
from tests.helpers import ROOT

# a user's script: a screen, a model, the embedding call that used to print its progress, then the same call
# after configuring logging the way the CLI does
SCRIPT = r"""
import sys, os
import mae_fast
from mae_fast.data.synthetic import SyntheticScreenConfig, make_synthetic_screen
from mae_fast.inference.embed import embed_dataset
from mae_fast.models import create_model

root = sys.argv[1]
screen = make_synthetic_screen(os.path.join(root, "screen"), SyntheticScreenConfig(
    n_experiments=1, n_plates=1, n_complexes=1, complex_size=2, n_singletons=0, n_empty_controls=1,
    n_crispr_controls=0, site_size=64, seed=1))
create_model("mae_vit_micro_patch16_256", img_size=64, depth=1).save_pretrained(os.path.join(root, "model"))
args = dict(num_workers=0, threads=1, progress=False, overwrite=True)
embed_dataset(os.path.join(root, "model"), screen.root, os.path.join(root, "e.parquet"), **args)
print("---", flush=True)
print("---", file=sys.stderr, flush=True)
from mae_fast.logs import configure_logging
configure_logging(0)
embed_dataset(os.path.join(root, "model"), screen.root, os.path.join(root, "e.parquet"), **args)
"""


def test_library_calls_print_nothing_until_logging_is_configured(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    silent, configured = proc.stdout.split("---\n")
    assert silent == "" and proc.stderr.split("---\n")[0] == "", (silent, proc.stderr)
    assert "embedding 3 sites on 1 plate(s) with mae_vit_micro_patch16_256" in configured
    assert " wells, 3 sites, 192 features -> " in configured


def test_configure_logging_levels_and_streams(capsys):
    log = logging.getLogger("mae_fast.some.module")
    try:
        configure_logging(0)
        configure_logging(0)  # again: replaces its handlers, no doubled lines
        log.debug("a detail")
        log.info("a note")
        log.warning("a problem")
        captured = capsys.readouterr()
        assert (captured.out, captured.err) == ("a note\n", "warning: a problem\n")
        configure_logging(-1)
        log.info("a note")
        log.error("broken")
        captured = capsys.readouterr()
        assert (captured.out, captured.err) == ("", "error: broken\n")
        configure_logging(1)
        log.debug("a detail")
        assert capsys.readouterr().out == "a detail\n"
    finally:
        logger = logging.getLogger("mae_fast")
        for handler in [h for h in logger.handlers if getattr(h, "_mae_fast", False)]:
            logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


@pytest.mark.parametrize("flags, expected", [([], 0), (["-q"], -1), (["--quiet"], -1), (["-v"], 1), (["-vv"], 2)])
def test_every_command_takes_verbose_and_quiet(flags, expected):
    for command in ("embed", "train", "evaluate", "pack", "demo", "bench", "flops"):
        parser = build_parser()
        for action in parser._subparsers._group_actions[0].choices[command]._actions:
            if action.required:  # fill the required options with a placeholder
                action.required = False
        assert verbosity(parser.parse_args([command, *flags])) == expected, command
