"""The one exception type for bad user input; run.py prints it as a single line."""


class HetjaxError(Exception):
  """A user-facing error: bad config, infeasible plan, malformed file, ..."""
