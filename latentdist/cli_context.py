"""Click context settings shared by the group and every subcommand.

Set on each command, not only the group: click caches a command's help option the first time
it is built, so a command run on its own must already know ``-h``.
"""

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
