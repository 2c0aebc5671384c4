"""Errors fxdp raises instead of training without the privacy guarantee."""


class PrivacyError(RuntimeError):
    """Base class: continuing would break differential privacy."""


class UncoveredParameterError(PrivacyError):
    """A trainable parameter is used by an operation no per-sample rule covers."""


class SampleMixingError(PrivacyError):
    """An operation makes one sample's output depend on other samples."""


class BatchLayoutError(PrivacyError):
    """The batch dimension of a tensor could not be determined reliably."""


class PrivacyConfigError(PrivacyError, ValueError):
    """A setup that cannot be trained privately as given (a wrapper, a loss normaliser, a data set
    holding an example twice, ...). Also a ``ValueError``, as these refusals were before."""
