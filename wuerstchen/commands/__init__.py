"""One module per `wuerstchen` subcommand: each has `add_arguments(parser)` and `run(args)`."""
