"""The multi-LoRA kernel families: ``bgmv`` pads every request to the batch's max rank, ``mbgmv`` does not."""

BACKENDS = ("bgmv", "mbgmv")
