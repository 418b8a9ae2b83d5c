"""The one exception type for bad user input; run.py prints it as a single line.

It is defined in kernels/ (which stands alone and raises it for bad arguments) and named
HetjaxError here."""

from kernels.errors import InputError as HetjaxError

__all__ = ['HetjaxError']
