"""valle: zero-shot text-to-speech with VALL-E (a neural-codec language model).

Importing the package is cheap: it pulls in neither torch nor numpy. Heavy modules are imported by the
verbs and engines that need them, so `valle --help` stays fast.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("valle")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
