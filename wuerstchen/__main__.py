"""`python -m wuerstchen ...` is the `wuerstchen` command."""

from .cli import main

main()
