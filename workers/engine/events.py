"""The event vocabulary's old import path, kept for the handlers and tests that use it.

The handler contract lives beside the worker, in :mod:`workers.events` (it decodes
data sets with pydicom and reads the clock, which the sans-IO engine never does);
this module only re-exports it.
"""

from workers.events import *  # noqa: F403
from workers.events import __all__ as __all__
