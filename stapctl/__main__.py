"""`python -m stapctl`, the same as the `stapctl` command."""

from stapctl.cli import main

main()
