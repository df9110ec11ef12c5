"""Evaluate a trained run's checkpoint on a split: the ``segexp-eval`` command, from the repo.

The code is :mod:`segexp.cli.evaluate`; ``segexp-eval --help`` lists the options.
"""

from segexp.cli.evaluate import cli

if __name__ == "__main__":
    cli()
