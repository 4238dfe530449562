"""The consoles every ``fedcare`` command prints through: one output policy.

``soft_wrap``: rich does not insert line breaks of its own, so a long path in a report
or an error stays whole (the terminal wraps it) and can be copied as printed.
"""

from rich.console import Console

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
