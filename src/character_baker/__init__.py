"""character-baker: bake a character into an open-weight chat model's weights."""

__version__ = "0.1.0"
