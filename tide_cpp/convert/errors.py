"""The one exception the converter raises for bad input: its message names the cause."""


class ConvertError(Exception):
    """Bad input or an unwritable output; str(e) is one line that names the file, tensor, key or
    value at fault."""
