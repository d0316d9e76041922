"""The one rich `Console` (stderr) shared by the display and the progress bars.

Its own module so `display` and `progress` both import it without importing each other.
"""

from rich.console import Console

__all__ = ["console"]

console = Console(stderr=True)
