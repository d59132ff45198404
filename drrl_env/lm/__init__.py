"""The frozen language model side: models, the attention kernel, the segment runner.

Usable without gymnasium. Importing this package imports no torch; its modules do.
"""

INPUT_STAT_NAMES = ("input_rms", "consecutive_cosine", "norm_spread")
"""Statistics of a layer's input (the sequence dynamics ``h_t`` of the observation)."""
