"""`python -m gmesh.cli` runs the gmesh command."""

from gmesh.cli import main

main()
