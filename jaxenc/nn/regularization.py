"""Old path of the DropBlock layers, which live in :mod:`jaxenc.nn.drop`."""

from jaxenc.nn.drop import DropBlock2D, DropBlock2d, drop_block2d, dropblock_seed_rate

__all__ = ["DropBlock2D", "DropBlock2d", "drop_block2d", "dropblock_seed_rate"]
