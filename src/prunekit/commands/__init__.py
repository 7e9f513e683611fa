"""The command-line commands, one module per area; each registers its subcommands here."""

from prunekit.registry import Registry

#: name -> function(subparsers) adding that area's subcommands; filled by importing every
#: module of this package
COMMANDS = Registry("command", packages=("prunekit.commands",))
