"""One module per `ctfix` command: `add_arguments(parser)` and `run(args) -> int`."""
