"""Bad input to a kernel. hetjax re-exports this class as `hetjax.errors.HetjaxError`, so a bad
argument reaches the user as one `error:` line, while kernels/ itself imports nothing of hetjax."""


class InputError(Exception):
  """A user-facing error: bad config, infeasible plan, malformed file, bad kernel argument, ..."""
