"""`loopcoder lm-eval ARGS`: lm-evaluation-harness's own command line, with `--model loopcoder` registered.

lm-eval releases that read the `lm_eval.models` entry point find the backend by themselves (`lm_eval
--model loopcoder ...`); this command works with every supported release. Arguments go to lm-eval as
they are, e.g. `loopcoder lm-eval run --model loopcoder --model_args pretrained=DIR --tasks NAME`.
"""

from __future__ import annotations

import sys

PASSTHROUGH = True


def run(argv: list[str]) -> int:
    # importing the backend registers "loopcoder" with lm-eval; without the lm-eval extra it is a one-line
    # error. Here, not at the top: `loopcoder --help` and the other commands' parsers never import it.
    from loopcoder.evaluation.lm_eval_backend import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as e:  # argparse's --help and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        sys.argv = saved
    return 0
