"""Errors users see. Each names what is wrong and where; the CLI prints them without a traceback."""


class NncError(Exception):
    """Base for every error nnc reports to a user."""


class IRParseError(NncError):
    pass


class VerifyError(NncError):
    pass


class ShapeError(NncError):
    """Shape/type inference rejected an op's operands or attributes."""


class ImportError_(NncError):
    """The ONNX model uses something nnc does not support, or is malformed."""


class InputError(NncError):
    """A run was given inputs with wrong names, dtypes or shapes."""
