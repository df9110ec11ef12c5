"""Train a segmentation model from a composed config (the same as the ``segexp-train`` command).

    python train.py                                   # U-Net / ResNet-18 on the synthetic dataset
    python train.py model=upernet backbone=convnext_tiny dataset=stanford_background
    python train.py -m model=fcn,unet,pspnet,deeplabv3,upernet trainer=debug
    python train.py --help                            # config groups and options
    torchrun --nproc_per_node=4 train.py ...          # distributed data parallel, one folder

The logic lives in :mod:`segexp.cli.train`.
"""

from segexp.cli.train import cli

if __name__ == "__main__":
    cli()
