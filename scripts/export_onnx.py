"""Export a trained run's model to ONNX: the ``segexp-export`` command, from the repo.

The code is :mod:`segexp.cli.export_onnx`; ``segexp-export --help`` lists the options.
"""

from segexp.cli.export_onnx import cli

if __name__ == "__main__":
    cli()
