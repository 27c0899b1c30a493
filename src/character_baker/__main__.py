"""`python -m character_baker` runs the CLI."""

from character_baker.cli import run

run()
