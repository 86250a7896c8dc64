"""The one exception of the prover."""


class Unproven(Exception):
    """The mask is not proven; ``args[0]`` is the reason, a sentence for the model author."""
