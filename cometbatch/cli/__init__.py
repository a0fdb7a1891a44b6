"""The command line: commands, options, the live display and the settings file."""
