"""Speed and size of segmentation models: the ``segexp-bench`` command, from the repo.

The code is :mod:`segexp.cli.benchmark`; ``segexp-bench --help`` lists the options.
"""

from segexp.cli.benchmark import cli

if __name__ == "__main__":
    cli()
