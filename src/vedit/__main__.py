"""`python -m vedit` runs the CLI."""

from vedit.cli import main

main()
