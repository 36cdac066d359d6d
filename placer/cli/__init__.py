"""The ``placer`` command line: :mod:`placer.cli.main` and one module per subcommand."""
