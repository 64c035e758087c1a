"""The one exception type a user is meant to read.

A PipelineError carries a single line that names the problem and the fix; the step
commands print it without a traceback and exit non-zero.
"""


class PipelineError(Exception):
    """A problem with the user's input or environment, with a message saying how to fix it."""
