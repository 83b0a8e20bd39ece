"""The plugin contract's old address, kept so plugins written against it keep loading.

The contract lives in :mod:`specdsl.contract`; import from there in new code.
"""

from specdsl.contract.hookspecs import *  # noqa: F401,F403
from specdsl.contract.hookspecs import hookimpl, hookspec  # noqa: F401  (explicit: the names plugins use most)
