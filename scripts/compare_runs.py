"""Compare finished runs (table, plots, HTML report): the ``segexp-compare`` command, from the repo.

The code is :mod:`segexp.cli.compare_runs`; ``segexp-compare --help`` lists the options.
"""

from segexp.cli.compare_runs import cli

if __name__ == "__main__":
    cli()
