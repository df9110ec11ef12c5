"""Predict masks for images, a folder or a video: the ``segexp-predict`` command, from the repo.

The code is :mod:`segexp.cli.predict`; ``segexp-predict --help`` lists the options.
"""

from segexp.cli.predict import cli

if __name__ == "__main__":
    cli()
