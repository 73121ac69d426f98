"""The CLI's commands, one module each, registered one way: `register(commands)` adds the
command's parser(s) to the `pijepa` subparsers and sets `run` (called with the parsed args; it
returns an exit code or None) and `command_name` (the words that prefix its error lines)."""
