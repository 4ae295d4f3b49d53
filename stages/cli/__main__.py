"""`python -m stages.cli ...`: the same as the `scalr` command."""

from stages.cli import main

main()
