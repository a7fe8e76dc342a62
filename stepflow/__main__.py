"""``python -m stepflow`` runs the command line."""

from stepflow._cli.main import main

main()
