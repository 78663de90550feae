"""`python -m immiscible_cli` runs the same app as the `immiscible` console script."""

from .cli import main

main()
