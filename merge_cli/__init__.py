"""merge-cli: deep model fusion from the command line."""

__version__ = "0.1.0"
